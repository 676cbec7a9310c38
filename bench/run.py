# -*- test-case-name: tests.test_bench -*-
"""
The benchmark: chatd against a plain Twisted + Autobahn broadcast
(bench/reference.py), driven by one fast load generator (bench/loadgen.py,
picows on uvloop).  docs/performance.md has the method and the figures.

    make bench                       # every scenario, full sizes
    .venv/bin/python bench/run.py 1  # one scenario
    .venv/bin/python bench/run.py 1 3 --runs 1 --members 50 --messages 100   # a quick look

Scenarios: 1 fan-out, 2 idle connections, 3 many small rooms, 4 fan-out
over two chatd instances and Redis, 5 fan-out with STOMP clients next to
fan-out with chatd.v1 clients, both on chatd (the reference has no STOMP).
Each run starts its servers afresh, pinned with taskset to the server core,
and the generator on its own core; chatd and reference runs alternate, and
each figure is the median of the runs with their min-max.  Before each
run it waits (bounded) for the machine to be quiet and records how busy it
was.  One JSON line per run and per summary goes to stdout, then a table.
Every process it starts is stopped by PID, on Ctrl-C and errors too.
"""

import argparse
import collections
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests import support  # noqa: E402

LOADGEN = os.path.join(HERE, "loadgen.py")
REFERENCE = os.path.join(HERE, "reference.py")
FLOOR = os.path.join(HERE, "floor.py")

# chatd's per-user limits are for people, not for one generator: lifted.
CHATD_OVERRIDES = dict(
    limits__rate="1000000", limits__burst="1000000", limits__max_connections="100000",
    limits__max_connections_per_ip="100000", limits__max_pending_per_ip="100000",
    limits__max_send_buffer_bytes=str(64 << 20),
    server__access_log="off",
)


def log(text):
    print(f"bench: {text}", file=sys.stderr, flush=True)


# -- the machine --


def cpu_times():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def busy_fraction(interval=1.0):
    busy0, total0 = cpu_times()
    time.sleep(interval)
    busy1, total1 = cpu_times()
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_quiet(threshold, limit):
    """Wait up to C{limit} s for the machine to be under C{threshold} busy; return what it was."""
    deadline = time.monotonic() + limit
    busy = busy_fraction(0.5)
    while busy > threshold and time.monotonic() < deadline:
        busy = busy_fraction(1.0)
    return {"machine_busy_before": round(busy, 2), "loadavg_1m": os.getloadavg()[0]}


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("twisted", "autobahn", "picows", "uvloop", "pyOpenSSL", "cryptography"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            versions[name] = None
    from OpenSSL import SSL

    return {
        "nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
        "openssl": SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(), **versions,
    }


# -- processes --


def pin(pid, cpu):
    """Pin every thread of C{pid} (and so the threads it starts later) to C{cpu}."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True)


class Reference:
    """
    bench/reference.py (or, as C{script}, bench/floor.py) as a process (the
    same interface as support.Chatd here).
    """

    def __init__(self, workdir, dev_dir, script=REFERENCE):
        self.workdir, self.dev_dir, self.script = workdir, dev_dir, script
        self.name = os.path.splitext(os.path.basename(script))[0]
        self.port = support.free_port()
        self.proc = None

    def start(self):
        self.log = open(os.path.join(self.workdir, f"{self.name}.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, self.script, "--port", str(self.port),
             "--certificate", os.path.join(self.dev_dir, "fullchain.pem"),
             "--private-key", os.path.join(self.dev_dir, "privkey.pem")],
            stdout=subprocess.PIPE, stderr=self.log,
        )
        line = self.proc.stdout.readline()  # "ready", or EOF when it failed
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the {self.name} server did not start (see {self.log.name})")
        return self

    def stop(self):
        if self.proc is not None:
            support.stop_pid(self.proc)
            self.proc.stdout.close()
            self.log.close()
            self.proc = None


class Setup:
    """The servers of one run: started, pinned, and stopped by PID whatever happens."""

    def __init__(self, bench, kind, instances=1):
        self.bench, self.kind, self.instances = bench, kind, instances
        # "chatd@REV": chatd from the snapshot of REV that --against made.
        self.env = {"PYTHONPATH": bench.snapshot} if kind.startswith("chatd@") else None
        self.servers = []
        self.watched = []  # processes whose CPU and memory count as the server's
        self.names = {}  # PID -> "reference", "redis", "chatd0", "chatd1"

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self):
        b = self.bench
        self.targets = []
        if self.kind.startswith("pair"):
            # --paired: the scenario's two variants side by side, in this
            # run's order: chatd at REV (each chatd with its own embedded
            # broker), this tree's chatd, the reference or the floor.
            for i, (kind, env) in enumerate(self.pair_order()):
                self._add(kind, i, env, CHATD_OVERRIDES)
        elif self.kind in ("reference", "floor"):
            self._add(self.kind)
        else:
            overrides = dict(CHATD_OVERRIDES)
            if self.instances > 1:
                redis = support.Redis(b.workdir)
                self.servers.append(redis)
                redis.start()
                pin(redis.proc.pid, b.args.server_cpu)
                self.watched.append(redis.proc.pid)
                self.names[redis.proc.pid] = "redis"
                overrides["redis__url"] = redis.url
            for i in range(self.instances):
                self._add(self.kind, i, self.env, overrides)
        for server in self.servers:
            if server.proc.pid not in self.watched:
                pin(server.proc.pid, b.args.server_cpu)
                self.watched.append(server.proc.pid)
        # The process to profile: the (first) chatd, or the reference.
        self.main_pid = next(s.proc.pid for s in self.servers if not isinstance(s, support.Redis))

    def _add(self, kind, index=0, env=None, overrides=None):
        """
        Start one server of C{kind} ("reference", "floor", or a chatd) and
        make it a target: chatd's connections fetch a ticket first.
        """
        b = self.bench
        if kind in ("reference", "floor"):
            server = Reference(b.workdir, b.workdir, REFERENCE if kind == "reference" else FLOOR)
            self.servers.append(server)
            server.start()
            self.names[server.proc.pid] = "reference"
        else:
            server = support.Chatd(b.workdir, b.workdir, b.secret, name=f"chatd{index}", **overrides)
            self.servers.append(server)
            server.start(env=env)
            self.names[server.proc.pid] = f"chatd{index}"
        self.targets.append(dict(host="127.0.0.1", port=server.port, ticket=kind not in ("reference", "floor")))

    def pair_order(self):
        """
        A --paired run's two servers as C{(kind, environment)}, the
        scenario's first variant (chatd at REV, the reference or the floor)
        first unless the kind ends in "~".
        """
        first = self.bench.pair_kinds[0]
        env = {"PYTHONPATH": self.bench.snapshot} if first.startswith("chatd@") else None
        pair = [(first, env), ("chatd", None)]
        return pair[::-1] if self.kind.endswith("~") else pair

    def __exit__(self, *exc):
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as e:  # noqa: BLE001 - stop the others all the same
                log(f"stopping {server!r}: {e}")
        self.servers = []


# -- scenarios --

# variants: (server kind, instances[, client protocol]); the ratio is the
# second's median over the first's, named ratio_name in the JSON summary.
Scenario = collections.namedtuple("Scenario", "number name method variants spec headline ratio_name")
Scenario.__new__.__defaults__ = ("ratio",)


def _fanout_spec(a):
    return dict(
        members=a.members, messages=a.messages, in_flight=a.in_flight, message_bytes=a.message_bytes,
        stomp_ids=a.stomp_ids,
    )


SCENARIOS = {
    1: Scenario(1, "fan-out", "fanout", [("reference", 1), ("chatd", 1)], _fanout_spec,
                ["deliveries_per_s", "server_cpu_us_per_delivery", "p50_ms", "p99_ms", "lost"]),
    2: Scenario(2, "idle connections", "idle", [("reference", 1), ("chatd", 1)],
                lambda a: dict(connections=a.connections),
                ["kib_per_connection", "cpu_ms_per_connection", "connections_per_s"]),
    3: Scenario(3, "small rooms", "rooms", [("reference", 1), ("chatd", 1)],
                lambda a: dict(rooms=a.rooms, rate=a.rate, duration=a.duration, message_bytes=a.message_bytes),
                ["server_cpu_ms_per_1000", "p50_ms", "p99_ms", "lost"]),
    # Scenario 4's yardstick is scenario 1 on one chatd (target: at least 0.9x),
    # so it alternates with that instead of with the reference.
    # talk_burst_p50 shows how the window refilled: at the window's size, the
    # servers and the generator took turns (docs/performance.md, scenario 4).
    4: Scenario(4, "fan-out, 2 chatd + Redis", "fanout", [("chatd", 1), ("chatd", 2)], _fanout_spec,
                ["deliveries_per_s", "server_cpu_us_per_delivery", "p50_ms", "p99_ms", "lost", "talk_burst_p50"]),
    # Scenario 5's yardstick is scenario 1 with chatd.v1 clients on the same
    # chatd: only the framing differs (STOMP SUBSCRIBE/SEND/MESSAGE).
    5: Scenario(5, "fan-out, STOMP clients", "fanout", [("chatd", 1, "json"), ("chatd", 1, "stomp")],
                _fanout_spec, ["deliveries_per_s", "server_cpu_us_per_delivery", "p50_ms", "p99_ms", "lost"],
                "stomp_vs_json"),
}


def variant_label(kind, instances, protocol=None):
    label = kind if instances == 1 else f"{kind} x{instances}"
    return label if protocol is None else f"{label} {protocol}"


def against(scenario, rev):
    """
    C{scenario} comparing chatd at C{rev} (first) with chatd of this tree
    (second), each in the scenario's own subject variant: two instances in
    4, STOMP clients in 5.  The ratio is then this tree over C{rev}.
    """
    _, *rest = scenario.variants[-1]
    return scenario._replace(variants=[(f"chatd@{rev}", *rest), ("chatd", *rest)], ratio_name="ratio")


def on_floor(scenario):
    """
    Scenario 2 measured against bench/floor.py instead of the reference: a
    TLS accept, handshake and canned 101 per connection, the least a server
    on this stack does, so chatd's CPU per connection reads against it.
    """
    return scenario._replace(variants=[("floor", 1), *scenario.variants[1:]])


def snapshot(rev, into):
    """Extract the tree of git revision C{rev} of this repository into C{into}."""
    repo = os.path.dirname(HERE)
    archive = subprocess.run(["git", "-C", repo, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return into


class Bench:
    def __init__(self, args):
        self.args = args
        self.workdir = tempfile.mkdtemp(prefix="chatd-bench-")
        self.secret = support.make_dev_files(self.workdir)
        self.results = []
        self.gen = None
        self.scenarios = dict(SCENARIOS)
        self.snapshot = None
        if args.against:
            # PYTHONPATH=snapshot puts its chatd (and its twistd plugin) ahead
            # of this tree's editable install.
            self.snapshot = snapshot(args.against, tempfile.mkdtemp(prefix="snapshot-", dir=self.workdir))
            self.scenarios = {n: against(s, args.against) for n, s in SCENARIOS.items()}
        if args.yardstick == "floor":
            self.scenarios[2] = on_floor(self.scenarios[2])
        # --paired: the kinds of scenario 2's two variants, the yardstick first.
        self.pair_kinds = [kind for kind, *_ in self.scenarios[2].variants]

    def run_generator(self, setup, scenario, spec_fields, profile_to=None, protocol=None, run=0):
        a = self.args
        spec = dict(
            scenario=scenario.method, targets=setup.targets, secret=self.secret.decode(),
            server_pids=setup.watched, concurrency=a.concurrency, timeout=a.timeout,
            protocol=protocol or "json", **spec_fields,
        )
        path = os.path.join(self.workdir, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        profiler = hook = None
        self.gen = subprocess.Popen(
            ["taskset", "-c", str(a.gen_cpu), sys.executable, LOADGEN, path], stdout=subprocess.PIPE,
        )
        result = None
        machine0 = machine1 = cpu_times()
        try:
            for line in self.gen.stdout:
                message = json.loads(line)
                name = message.pop("event")
                if name == "measuring":
                    machine0 = cpu_times()
                    if profile_to:
                        profiler = self.start_profiler(setup.main_pid, profile_to)
                    if a.hook:
                        hook = self.start_hook(setup, scenario, run)
                elif name == "measured":
                    machine1 = cpu_times()
                    if profiler is not None:
                        self.stop_profiler(profiler)
                        profiler = None
                    if hook is not None:
                        self.stop_hook(hook)
                        hook = None
                elif name == "result":
                    result = message
                    if machine1 is machine0:
                        machine1 = cpu_times()
            self.gen.wait(30)
        finally:
            if profiler is not None:
                self.stop_profiler(profiler)
            if hook is not None:
                self.stop_hook(hook)
            support.stop_pid(self.gen)
            self.gen.stdout.close()
            self.gen = None
        if result is None:
            raise RuntimeError("the load generator failed (its stderr is above)")
        # What everything else on the machine used meanwhile, in cores.
        busy = (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1]) * os.cpu_count()
        others = busy - (result["server_cpu_s"] + result["gen_cpu_s"]) / max(result["wall_s"], 1e-9)
        result["others_cores"] = round(max(0.0, others), 2)
        names = [setup.names.get(pid, str(pid)) for pid in setup.watched]
        result["server_processes"] = dict(zip(names, result["server_processes"]))
        result["server_pids"] = dict(zip(names, setup.watched))
        return result

    def start_hook(self, setup, scenario, run):
        """
        C{--hook}: the user's command for this measuring phase, on the
        generator's core, in a session of its own (stopped with SIGINT as a
        whole at the end of the phase).
        """
        fields = {setup.names[pid]: pid for pid in setup.watched}
        fields.update(
            pids=",".join(str(pid) for pid in setup.watched), scenario=scenario.number, run=run,
            server="-".join(sorted(setup.names.values())) + ("" if setup.env is None else "-against"),
        )
        command = self.args.hook.format_map(collections.defaultdict(str, fields))  # absent: ""
        log(f"hook: {command}")
        return subprocess.Popen(
            ["taskset", "-c", str(self.args.gen_cpu), "sh", "-c", command], start_new_session=True,
        )

    def stop_hook(self, proc):
        try:
            os.killpg(proc.pid, signal.SIGINT)  # perf and strace write their results on SIGINT
            proc.wait(60)
        except ProcessLookupError:
            pass  # it ended by itself
        except subprocess.TimeoutExpired:
            support.stop_pid(proc)

    def start_profiler(self, pid, out):
        a = self.args
        if a.profiler == "perf":
            # The kernel and OpenSSL too, which py-spy does not see; read with
            # `perf report -i FILE` (or `perf script`).
            log(f"perf record on PID {pid} -> {out}")
            command = ["perf", "record", "-e", "cpu-clock", "-g", "-F", str(a.profile_rate),
                       "-p", str(pid), "-o", out]
        else:
            py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            log(f"py-spy record on PID {pid} -> {out}")
            command = [py_spy, "record", "--pid", str(pid), "--rate", str(a.profile_rate),
                       "--format", "raw", "--output", out, "--nonblocking"]
            if a.profiler == "py-spy-native":
                command[-1:] = ["--native"]  # native frames need the process stopped per sample
        return subprocess.Popen(
            ["taskset", "-c", str(a.gen_cpu), *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop_profiler(self, proc):
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            support.stop_pid(proc)

    def one_run(self, scenario, variant, run, profile_to=None):
        a = self.args
        kind, instances, *protocol = variant
        protocol = protocol[0] if protocol else None
        quiet = wait_quiet(a.quiet_threshold, a.quiet_wait)
        with Setup(self, kind, instances) as setup:
            result = self.run_generator(setup, scenario, scenario.spec(a), profile_to, protocol, run)
        record = dict(
            scenario=scenario.number, name=scenario.name, server=variant_label(*variant), run=run,
            **quiet, **result,
        )
        if protocol == "stomp":
            record["stomp_ids"] = a.stomp_ids
        if profile_to:
            record["profile"] = profile_to
        else:
            self.results.append(record)
        print(json.dumps(record), flush=True)
        return record

    def paired(self, number):
        """
        Scenario 2 with its two servers in the same run (chatd at REV, the
        reference or the floor, and this tree's chatd), side by side on the
        server core, the generator's connections alternating between them:
        a drift of the machine's speed between runs, which moved scenario 2
        by up to 30 % from run to run, falls on both alike.  Each run gives
        one record per server and their ratio.
        """
        scenario = self.scenarios[number]
        labels = [variant_label(*variant) for variant in scenario.variants]
        for run in range(1, self.args.runs + 1):
            # Which one gets the first connection of each pair flips every run.
            kind = "pair" if run % 2 else "pair~"
            log(f"scenario {number} ({scenario.name}), {labels[0]} and {labels[1]} paired, run {run}")
            quiet = wait_quiet(self.args.quiet_threshold, self.args.quiet_wait)
            with Setup(self, kind) as setup:
                result = self.run_generator(setup, scenario, dict(scenario.spec(self.args), paired=True))
            each = result.pop("each")
            if kind.endswith("~"):
                each = each[::-1]
            for label, mine in zip(labels, each):
                record = dict(
                    scenario=number, name=scenario.name, server=label, run=run, paired=True,
                    **quiet, **{**result, **mine},
                )
                self.results.append(record)
                print(json.dumps(record), flush=True)
            print(json.dumps({
                "scenario": number, "run": run, "paired_ratio":
                round(each[1]["cpu_ms_per_connection"] / each[0]["cpu_ms_per_connection"], 3),
            }), flush=True)

    def scenario(self, number):
        if self.args.paired:
            self.paired(number)
            return
        scenario = self.scenarios[number]
        for run in range(1, self.args.runs + 1):
            # Alternate which server goes first, so a drift in the machine's
            # load does not always favour the same one.
            variants = scenario.variants if run % 2 else list(reversed(scenario.variants))
            for variant in variants:
                log(f"scenario {number} ({scenario.name}), {variant_label(*variant)}, run {run}")
                self.one_run(scenario, variant, run)

    def profile(self):
        out = os.path.abspath(self.args.profile)
        # The scenario's second variant: chatd in 1-3, two chatd in 4, STOMP
        # clients in 5; --profile-variant 1: the first (the reference in 1-3).
        scenario = self.scenarios[self.args.profile_scenario]
        variant = scenario.variants[self.args.profile_variant - 1]
        log(f"scenario {scenario.number} on {variant_label(*variant)} under {self.args.profiler}"
            " (not counted in the figures)")
        self.one_run(scenario, variant, 0, profile_to=out)
        if self.args.profiler != "perf":
            print_profile(out, self.args.profile_top, f"scenario {scenario.number}, {variant_label(*variant)}")

    def summary(self):
        rows = []
        for number in sorted({r["scenario"] for r in self.results}):
            scenario = self.scenarios[number]
            by_server = collections.defaultdict(list)
            for r in self.results:
                if r["scenario"] == number:
                    by_server[r["server"]].append(r)
            labels = [variant_label(*v) for v in scenario.variants]
            for key in scenario.headline + ["server_cpu_pct", "gen_cpu_pct", "others_cores"]:
                summary = {"summary": True, "scenario": number, "name": scenario.name, "figure": key}
                for label in labels:
                    values = [r[key] for r in by_server[label] if r.get(key) is not None]
                    if values:
                        summary[label] = {
                            "median": statistics.median(values), "min": min(values), "max": max(values),
                            "runs": len(values),
                        }
                base, other = labels
                if base in summary and other in summary and summary[base]["median"]:
                    summary[scenario.ratio_name] = round(summary[other]["median"] / summary[base]["median"], 2)
                print(json.dumps(summary), flush=True)
                rows.append((number, scenario.name, key, labels, summary, scenario.ratio_name))
        print_table(rows)


def fmt(cell):
    if cell is None:
        return "-"
    def num(x):
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"
    return f"{num(cell['median'])} ({num(cell['min'])}-{num(cell['max'])})"


def print_table(rows):
    header = ["scenario", "figure", "A", "B", "B/A"]
    lines = []
    for number, name, key, labels, summary, ratio_name in rows:
        lines.append([
            f"{number} {name}", key,
            f"{labels[0]}: {fmt(summary.get(labels[0]))}", f"{labels[1]}: {fmt(summary.get(labels[1]))}",
            "-" if ratio_name not in summary else (
                str(summary[ratio_name]) + ("" if ratio_name == "ratio" else f" ({ratio_name})")
            ),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    print()
    print("median (min-max) of the runs; B/A = ratio of the medians")
    for line in [header] + lines:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def print_profile(path, top, what="scenario 1, chatd"):
    """The top frames of a py-spy raw (collapsed) profile: own time and total time."""
    own, total, samples = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count)
            samples += count
            # "func (file:line)" -> "func (file)": time per function, not per line.
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    print(f"\npy-spy: {samples} samples of the server under {what} ({path})")
    for title, counter in (("own time", own), ("total time (incl. callees)", total)):
        print(f"top {top} by {title}:")
        for frame, count in counter.most_common(top):
            print(f"  {100 * count / max(1, samples):5.1f}%  {frame}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("scenarios", nargs="*", type=int, default=[1, 2, 3, 4, 5], help="scenario numbers")
    parser.add_argument("--runs", type=int, default=3, help="runs of each server per scenario")
    parser.add_argument("--members", type=int, default=1000, help="1, 4, 5: room members (the sender is one)")
    parser.add_argument("--messages", type=int, default=2000, help="1, 4, 5: messages sent")
    parser.add_argument("--in-flight", type=int, default=20, help="1, 4, 5: messages not yet delivered to all")
    parser.add_argument("--message-bytes", type=int, default=100, help="TALK text length")
    parser.add_argument("--stomp-ids", choices=["shared", "unique"], default="shared",
                        help="5: every member's subscription id sub-0 (as stomp.js), or each its own")
    parser.add_argument("--connections", type=int, default=5000, help="2: idle connections")
    parser.add_argument("--rooms", type=int, default=500, help="3: rooms of two members")
    parser.add_argument("--rate", type=float, default=2000, help="3: messages per second, all rooms")
    parser.add_argument("--duration", type=float, default=10, help="3: seconds of sending")
    parser.add_argument("--concurrency", type=int, default=20, help="connections opened at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a phase may take")
    parser.add_argument("--server-cpu", type=int, default=0, help="core for the servers")
    parser.add_argument("--gen-cpu", type=int, default=1, help="core for the load generator")
    parser.add_argument("--quiet-threshold", type=float, default=0.2, help="machine busy fraction deemed quiet")
    parser.add_argument("--quiet-wait", type=float, default=30, help="seconds to wait for quiet before a run")
    parser.add_argument("--against", metavar="REV",
                        help="compare chatd at git revision REV with this tree's, instead of with the reference")
    parser.add_argument("--yardstick", choices=["reference", "floor"], default="reference",
                        help="2: what chatd is measured against: the reference server, or bench/floor.py "
                             "(TLS and a canned 101 per connection, the least any server here does)")
    parser.add_argument("--paired", action="store_true",
                        help="2 alone: its two servers (the reference, the floor, or chatd at --against's REV, "
                             "and this tree's chatd) in each run, side by side, connections alternating")
    parser.add_argument("--profile", metavar="FILE", help="also run one scenario on chatd under py-spy into FILE")
    parser.add_argument("--profile-scenario", type=int, default=1, choices=sorted(SCENARIOS),
                        help="the scenario --profile runs, on its second variant (5: STOMP clients)")
    parser.add_argument("--profile-variant", type=int, default=2, choices=(1, 2),
                        help="the variant --profile runs: 2 chatd (this tree), 1 the reference (or chatd@REV)")
    parser.add_argument("--profiler", choices=("py-spy", "py-spy-native", "perf"), default="py-spy",
                        help="--profile's profiler: py-spy, py-spy --native (C frames too), or "
                        "perf record -e cpu-clock -g (the kernel and OpenSSL; FILE is perf.data)")
    parser.add_argument("--profile-rate", type=int, default=200, help="--profile's samples per second")
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--hook", metavar="CMD",
                        help="a shell command run (on the generator's core) during each measuring phase, "
                             "stopped with SIGINT at its end; {pids}: the server PIDs, comma-separated; "
                             "{chatd0}, {chatd1}, {redis}, {reference}: one PID (empty if there is none); {scenario}, {run}, "
                             "{server}")
    args = parser.parse_args(argv)
    for number in args.scenarios:
        if number not in SCENARIOS:
            parser.error(f"no scenario {number}: there are {sorted(SCENARIOS)}")
    if args.paired and set(args.scenarios) != {2}:
        parser.error("--paired is for scenario 2 alone")
    if args.yardstick == "floor" and (args.against or set(args.scenarios) != {2}):
        parser.error("--yardstick floor is for scenario 2 alone, without --against")
    if os.cpu_count() < 2:
        log("one core: server and generator share it, the figures measure both")
        args.server_cpu = args.gen_cpu = 0
    return args


def main(argv=None):
    args = parse_args(argv)
    # 5000 connections on each side; children inherit the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop what was started
    bench = Bench(args)
    print(json.dumps({"machine": machine()}), flush=True)
    try:
        for number in args.scenarios:
            bench.scenario(number)
        if args.profile:
            bench.profile()
    except KeyboardInterrupt:
        log("interrupted: every process stopped; the figures so far:")
    finally:
        if bench.gen is not None:
            support.stop_pid(bench.gen)
        bench.summary()
        shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
