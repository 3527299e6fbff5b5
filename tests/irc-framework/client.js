// An IRC client that is not ours, over the browser door's WebSocket: irc-framework, the library Kiwi IRC
// is built on. It signs in (with SASL when given an account), joins #lobby, says hello, and tells what
// happens as JSON lines on stdout until someone says "bye kiwi" or 15 seconds pass.
//
//   node client.js PORT SUBPROTOCOL [ACCOUNT PASSWORD]      (SUBPROTOCOL "" asks for none, as gamja does)
"use strict";
global.WebSocket = require("ws");          // Node 20 has no WebSocket of its own
const IRC = require("irc-framework");

const [port, subprotocol, account, password] = process.argv.slice(2);
const tell = (event, fields) => console.log(JSON.stringify({event, ...fields}));
const deadline = setTimeout(() => { tell("timeout", {}); process.exit(2); }, 15000);

const client = new IRC.Client();
client.connect({
  host: "127.0.0.1", port: Number(port), path: "/socket", ssl: false,
  transport: require("irc-framework/src/transports/websocket"),
  websocket_protocol: subprotocol || undefined,
  nick: "kiwi", username: "kiwi", gecos: "irc-framework",
  account: account ? {account, password} : undefined,
});
client.on("registered", () => {
  tell("registered", {nick: client.user.nick, caps: client.network.cap.enabled});
  client.join("#lobby");
});
client.on("loggedin", event => tell("loggedin", {account: event.account}));
client.on("join", event => {
  if (event.nick !== client.user.nick) return;
  tell("joined", {channel: event.channel});
  client.say("#lobby", "hello from irc-framework");
});
client.on("message", event => {
  tell("message", {nick: event.nick, target: event.target, text: event.message, time: (event.tags || {}).time});
  if (event.message === "bye kiwi") client.quit("done");
});
client.on("close", () => { clearTimeout(deadline); tell("closed", {}); process.exit(0); });
