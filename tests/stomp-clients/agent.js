// A real STOMP client driven by the tests (tests/test_stomp_clients.py)
// over stdin/stdout, one JSON object per line.
//
//   node agent.js '{"lib": "stompjs7" | "stompjs2-sockjs", "url": "wss://...", ...}'
//
// Commands in: {"op": "connect", "headers": {...}, "heartbeat": [out, in]}
//              {"op": "subscribe", "destination": D, "headers": {...}}
//              {"op": "unsubscribe", "id": ID}
//              {"op": "send", "destination": D, "body": "...", "headers": {...}}
//              {"op": "disconnect"}   {"op": "exit"}
// Events out:  {"ev": "connected" | "message" | "receipt" | "error",
//               "headers": {...}, "body": "..."}
//              {"ev": "closed", "code": N, "reason": "..."}
//              {"ev": "raw", "text": "..."}: the client's own log of the wire
//
// TLS is verified against NODE_EXTRA_CA_CERTS (the tests' certificate).
'use strict';

const readline = require('readline');

const options = JSON.parse(process.argv[2]);
const subscriptions = {};

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function headersOf(frame) {
  return Object.assign({}, frame.headers);
}

// --- @stomp/stompjs 7 over ws (plain STOMP over WebSocket) ---------------------

function stompjs7() {
  const { Client } = require('@stomp/stompjs');
  const WebSocket = require('ws');
  let client = null;
  return {
    connect(cmd) {
      const [outgoing, incoming] = cmd.heartbeat || [10000, 10000];
      client = new Client({
        webSocketFactory: () => new WebSocket(options.url, options.protocols || ['v12.stomp', 'v11.stomp', 'v10.stomp']),
        connectHeaders: cmd.headers || {},
        heartbeatOutgoing: outgoing,
        heartbeatIncoming: incoming,
        reconnectDelay: 0,
        logRawCommunication: true,
        debug: (text) => {
          if (text.startsWith('>>>') || text.startsWith('<<<')) emit({ ev: 'raw', text });
        },
        onConnect: (frame) => emit({ ev: 'connected', headers: headersOf(frame) }),
        onStompError: (frame) => emit({ ev: 'error', headers: headersOf(frame), body: frame.body }),
        onWebSocketClose: (evt) => emit({ ev: 'closed', code: evt.code, reason: evt.reason }),
        onUnhandledMessage: (frame) => emit({ ev: 'unhandled', headers: headersOf(frame), body: frame.body }),
        onUnhandledReceipt: (frame) => emit({ ev: 'receipt', headers: headersOf(frame) }),
      });
      client.activate();
    },
    subscribe(cmd) {
      const headers = cmd.headers || {};
      const sub = client.subscribe(cmd.destination, (msg) => {
        emit({ ev: 'message', headers: headersOf(msg), body: msg.body });
      }, headers);
      subscriptions[sub.id] = sub;
      emit({ ev: 'subscribed', id: sub.id });
    },
    unsubscribe(cmd) {
      subscriptions[cmd.id].unsubscribe(cmd.headers || {});
      delete subscriptions[cmd.id];
    },
    send(cmd) {
      client.publish({ destination: cmd.destination, body: cmd.body || '', headers: cmd.headers || {} });
    },
    disconnect() {
      client.deactivate().then(() => emit({ ev: 'deactivated' }));
    },
  };
}

// --- stompjs 2.3.3 over sockjs-client 1.6.1 (SockJS framing) -------------------

function stompjs2() {
  const Stomp = require('stompjs');
  const SockJS = require('sockjs-client');
  let client = null;
  return {
    connect(cmd) {
      const sock = new SockJS(options.url, null, { transports: ['websocket'] });
      client = Stomp.over(sock);
      const [outgoing, incoming] = cmd.heartbeat || [10000, 10000];
      client.heartbeat.outgoing = outgoing;
      client.heartbeat.incoming = incoming;
      client.debug = (text) => {
        if (text.startsWith('>>>') || text.startsWith('<<<')) emit({ ev: 'raw', text });
      };
      client.onreceipt = (frame) => emit({ ev: 'receipt', headers: headersOf(frame) });
      sock.addEventListener('close', (evt) => emit({ ev: 'closed', code: evt.code, reason: evt.reason }));
      client.connect(cmd.headers || {}, (frame) => {
        emit({ ev: 'connected', headers: headersOf(frame) });
      }, (error) => {
        if (typeof error === 'string') return; // "Whoops! Lost connection": the close event says it
        emit({ ev: 'error', headers: headersOf(error), body: error.body });
      });
    },
    subscribe(cmd) {
      const sub = client.subscribe(cmd.destination, (msg) => {
        emit({ ev: 'message', headers: headersOf(msg), body: msg.body });
      }, Object.assign({}, cmd.headers || {}));
      subscriptions[sub.id] = sub;
      emit({ ev: 'subscribed', id: sub.id });
    },
    unsubscribe(cmd) {
      subscriptions[cmd.id].unsubscribe();
      delete subscriptions[cmd.id];
    },
    send(cmd) {
      client.send(cmd.destination, Object.assign({}, cmd.headers || {}), cmd.body || '');
    },
    disconnect() {
      client.disconnect(() => emit({ ev: 'deactivated' }));
    },
  };
}

const libs = { 'stompjs7': stompjs7, 'stompjs2-sockjs': stompjs2 };
const lib = libs[options.lib]();

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line);
  if (cmd.op === 'exit') process.exit(0);
  try {
    lib[cmd.op](cmd);
  } catch (e) {
    emit({ ev: 'exception', op: cmd.op, text: String(e && e.stack || e) });
  }
}).on('close', () => process.exit(0));

process.on('uncaughtException', (e) => {
  emit({ ev: 'exception', text: String(e && e.stack || e) });
});

emit({ ev: 'ready', lib: options.lib });
