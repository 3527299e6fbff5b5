// pyChat's web client: IRC over the server's WebSocket (/socket), in plain JavaScript.
//
// It reads top to bottom: IRC messages (parsing, formatting); the state (buffers: rooms, private
// conversations and the server's window); rendering (every piece of text someone sent is put in the page
// with textContent, never as HTML); the connection (sign-in with CAP and SASL, reconnection with backoff);
// what the server says (one handler per IRC command, in HANDLERS); what the person types (slash commands,
// Tab completion, drafts, Alt-1..9). History (draft/chathistory, batch, read markers) is HISTORY's.
"use strict";

// -- IRC messages -------------------------------------------------------------------------------------

const SERVICE = "pyChat";       // the service nickname through which pyChat's own commands are reached
const WANTED_CAPS = ["server-time", "echo-message", "message-tags", "away-notify", "account-tag",
                     "multi-prefix", "cap-notify", "setname", "invite-notify"];

function unescapeTag(value) {
  return value.replace(/\\(.?)/g, (_, c) => ({":": ";", s: " ", r: "\r", n: "\n", "\\": "\\"})[c] ?? c);
}

/** One IRC line as {tags, source, nick, command, params}. */
function parseMessage(line) {
  const message = {tags: {}, source: null, nick: null, command: "", params: []};
  let rest = line;
  if (rest.startsWith("@")) {
    const space = rest.indexOf(" ");
    for (const tag of rest.slice(1, space).split(";")) {
      const eq = tag.indexOf("=");
      if (eq < 0) message.tags[tag] = "";
      else message.tags[tag.slice(0, eq)] = unescapeTag(tag.slice(eq + 1));
    }
    rest = rest.slice(space + 1).replace(/^ +/, "");
  }
  if (rest.startsWith(":")) {
    const space = rest.indexOf(" ");
    message.source = rest.slice(1, space);
    message.nick = message.source.split("!")[0];
    rest = rest.slice(space + 1).replace(/^ +/, "");
  }
  while (rest) {
    if (rest.startsWith(":")) { message.params.push(rest.slice(1)); break; }
    const space = rest.indexOf(" ");
    if (space < 0) { message.params.push(rest); break; }
    message.params.push(rest.slice(0, space));
    rest = rest.slice(space + 1).replace(/^ +/, "");
  }
  message.command = (message.params.length ? message.params.shift() : "").toUpperCase();
  return message;
}

/** An IRC line: the last parameter gets its ':' when it needs one. */
function formatMessage(command, ...params) {
  const last = params.length ? params[params.length - 1] : null;
  const middle = params.slice(0, -1);
  if (last === null) return command;
  const trailing = last === "" || last.includes(" ") || last.startsWith(":");
  return [command, ...middle, trailing ? ":" + last : last].join(" ");
}

// IRC formatting codes (bold, colours...) are shown as plain text.
const FORMATTING = /\x03(?:\d{1,2}(?:,\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}(?:,[0-9a-fA-F]{6})?)?|[\x02\x0f\x11\x16\x1d\x1e\x1f]/g;
function plain(text) { return text.replace(FORMATTING, ""); }

function lower(name) { return name.toLowerCase(); }
function isChannel(name) { return name.startsWith("#"); }

const MAX_LINE_BYTES = 510;       // an IRC message without its tags and CR LF
// What one press of Enter may send: about pyChat's own longest line (4096 bytes), in nine IRC messages or so,
// within the server's burst; a longer paste would be refused in part as flooding.
const MAX_TYPED_BYTES = 4000;
const encoder = new TextEncoder();
function byteLength(text) { return encoder.encode(text).length; }

/** TEXT in pieces of at most BUDGET bytes of UTF-8, in order: cut at the last space of a piece where there
 * is one in its second half (the space is left out), else between two characters. */
function splitBytes(text, budget) {
  const pieces = [];
  let rest = text;
  while (byteLength(rest) > budget) {
    let size = 0, end = 0;
    for (const character of rest) {
      size += byteLength(character);
      if (size > budget) break;
      end += character.length;
    }
    const space = rest.lastIndexOf(" ", end);
    const cut = space > end / 2 ? space : end;
    pieces.push(rest.slice(0, cut));
    rest = rest.slice(cut === space ? cut + 1 : cut);
  }
  if (rest) pieces.push(rest);
  return pieces;
}

/** TEXT in pieces that each fit a PRIVMSG to TARGET, with WRAPPING more bytes around each (an action's), once
 * the server has put our NICK!USER@HOST before it, as it relays it: a longer one it would cut short. Until
 * our own JOIN has shown which user and host we have, room is left for the longest. */
function messagePieces(target, text, wrapping = 0) {
  const source = `:${state.nick}${state.userHost || "!" + "u".repeat(10) + "@" + "h".repeat(63)} `;
  return splitBytes(text, MAX_LINE_BYTES - byteLength(source + formatMessage("PRIVMSG", target, "")) - wrapping);
}

/** UTF-8 text as base64, for SASL PLAIN. */
function base64(text) {
  let binary = "";
  for (const byte of encoder.encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary);
}

// -- state ---------------------------------------------------------------------------------------------

const SERVER_BUFFER = "*server*";
const MAX_LINES = 1000;           // kept per buffer; older ones leave the page

const state = {
  socket: null,
  nick: "",                       // the nickname the server gave us
  userHost: "",                   // "!user@host", as the server shows us to others (from our own JOIN)
  wanted: {nick: "", password: "", serverPassword: "", code: ""},
  caps: new Set(),
  registered: false,
  registering: false,             // signing in with a code: REGISTER and VERIFY instead of SASL
  buffers: new Map(),             // by lower-case name: {name, kind, lines, unread, mentions, topic, members, joined, draft}
  order: [],                      // lower-case names, in the room list's order
  current: SERVER_BUFFER,
  attempts: 0,                    // reconnections tried since the last success
  retryTimer: null,
  countdown: null,                // the status bar's "reconnecting in N s", ticking
  signedOut: true,
  closing: false,                 // the person quit: no reconnection
  fatal: "",                      // why the sign-in failed, when retrying would fail again
  completion: null,               // Tab completion under way: {prefix, matches, index, start}
};

function buffer(name, kind) {
  const key = lower(name);
  let found = state.buffers.get(key);
  if (!found) {
    found = {name, kind: kind || (name === SERVER_BUFFER ? "server" : isChannel(name) ? "channel" : "query"),
             lines: [], unread: 0, mentions: 0, topic: "", members: new Map(), joined: false,
             draft: sessionStorage.getItem("pychat.draft." + key) || "",
             msgids: new Set(),   // of the lines shown, so that history and live lines are shown once
             readAt: null,        // the read position (a Date) the server last told us, null for none
             marked: null,        // the newest read position we sent
             fetched: false,      // its latest lines were asked for on this connection
             older: false,        // older lines asked for and not yet come
             historyDone: false}; // nothing older is left to load
    state.buffers.set(key, found);
    state.order.push(key);
    renderRooms();
  }
  return found;
}

function dropBuffer(name) {
  const key = lower(name);
  if (key === SERVER_BUFFER) return;
  state.buffers.delete(key);
  state.order = state.order.filter(k => k !== key);
  sessionStorage.removeItem("pychat.draft." + key);
  if (state.current === key) switchTo(state.order.find(k => k !== SERVER_BUFFER) || SERVER_BUFFER);
  renderRooms();
}

/** Forget the person signed in: every buffer but the server's (emptied too), the tab's stored rooms and drafts,
 * and what history was under way, so that whoever signs in next in this tab sees nothing of theirs. */
function forgetPerson() {
  for (const key of Object.keys(sessionStorage)) if (key.startsWith("pychat.")) sessionStorage.removeItem(key);
  const server = state.buffers.get(SERVER_BUFFER);
  state.buffers = new Map([[SERVER_BUFFER, server]]);
  state.order = [SERVER_BUFFER];
  Object.assign(server, {lines: [], unread: 0, mentions: 0, draft: "", msgids: new Set()});
  HISTORY.reset();
  clearTimeout(HISTORY.markTimer);
  state.switchOnJoin = null;
  $("input").value = "";
  switchTo(SERVER_BUFFER);
}

function rememberRooms() {
  const rooms = [...state.buffers.values()].filter(b => b.kind === "channel" && b.joined).map(b => b.name);
  sessionStorage.setItem("pychat.rooms", JSON.stringify(rooms));
}

// -- rendering -----------------------------------------------------------------------------------------

const $ = id => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function nickClass(nick) {
  let hash = 0;
  for (const ch of lower(nick)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return "nick n" + (hash % 12);
}

const LINK = /\bhttps?:\/\/[^\s<>"'`]+[^\s<>"'`.,;:!?)\]}]/gi;

/** TEXT as text nodes and links: only http and https addresses become links, and only through href. */
function richText(text) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  for (const match of text.matchAll(LINK)) {
    let url = null;
    try { url = new URL(match[0]); } catch (_) { url = null; }
    if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) continue;
    fragment.append(document.createTextNode(text.slice(last, match.index)));
    const link = element("a", "", match[0]);
    link.href = url.href;
    link.target = "_blank";
    link.rel = "noopener noreferrer nofollow";
    fragment.append(link);
    last = match.index + match[0].length;
  }
  fragment.append(document.createTextNode(text.slice(last)));
  return fragment;
}

function timeText(date) {
  return date.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
}

/** The heading of a day's lines: "Today", "Yesterday", or its date. */
function dayText(date) {
  const midnight = when => new Date(when.getFullYear(), when.getMonth(), when.getDate());
  const days = Math.round((midnight(new Date()) - midnight(date)) / 86400000);
  if (days === 0) return "Today";
  if (days === 1) return "Yesterday";
  return date.toLocaleDateString([], {weekday: "long", year: "numeric", month: "long", day: "numeric"});
}

/** Head the first line of each day in the log with the day (data-day, shown by the style sheet), from
 * FROM to the end (the whole log without it). A log of today's lines alone has no heading. */
function markDays(log, from) {
  let previous = from ? from.previousElementSibling : null;
  while (previous && !previous.querySelector("time")) previous = previous.previousElementSibling;
  let lastDay = previous ? previous.querySelector("time").dataset.day : null;
  for (let item = from || log.firstElementChild; item; item = item.nextElementSibling) {
    const time = item.querySelector("time");
    if (!time) continue;                        // the "new since you left" divider
    const day = time.dataset.day;
    const heading = day !== lastDay && !(lastDay === null && day === dayText(new Date())) ? day : null;
    if (heading) item.dataset.day = heading; else delete item.dataset.day;
    lastDay = day;
  }
}

/** A line's element: its time, then the speaker and the words, or the words of an event. */
function lineElement(line) {
  const item = element("li", line.kind + (line.mention ? " mention" : ""));
  if (line.kind === "divider") { item.textContent = line.text; return item; }
  const time = element("time", "time", timeText(line.time));
  time.dateTime = line.time.toISOString();
  time.dataset.day = dayText(line.time);
  item.append(time);
  const body = element("span", "body");
  if (line.kind === "action") {
    body.append("* ", element("span", nickClass(line.nick), line.nick), " ", richText(line.text));
  } else if (line.nick) {
    body.append(element("span", nickClass(line.nick), line.nick), line.kind === "notice" ? " (notice): " : ": ",
                richText(line.text));
  } else {
    body.append(richText(line.text));
  }
  item.append(body);
  return item;
}

/** Add a line to a buffer; counted as unread (and a mention) unless it is the one shown. */
function addLine(name, line) {
  const target = buffer(name);
  if (line.msgid && target.msgids.has(line.msgid)) return;      // already shown (from history)
  if (line.msgid) target.msgids.add(line.msgid);
  line.time = line.time || new Date();
  if (isLaterPiece(target, line)) line.counts = false;          // its message was counted once, at its first piece
  target.lines.push(line);
  if (target.lines.length > MAX_LINES) forgetLine(target, target.lines.shift());
  const shown = lower(name) === state.current;
  if (shown) {
    const log = $("log");
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    const item = lineElement(line);
    log.append(item);
    markDays(log, item);
    while (log.children.length > MAX_LINES) log.firstChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
    HISTORY.look();
  }
  if (line.counts && (!shown || document.hidden)) {
    if (!shown) target.unread += 1;
    if (line.mention && !shown) target.mentions += 1;
    if (line.mention || target.kind === "query") notify(target, line);
    renderRooms();
  }
}

/** Whether LINE is a later piece (msgid ID-1, ID-2...) of a long message whose first piece (ID) B shows. */
function isLaterPiece(b, line) {
  return Boolean(line.msgid) && baseId(line.msgid) !== line.msgid && b.msgids.has(baseId(line.msgid));
}

function forgetLine(b, line) {
  if (line.msgid) b.msgids.delete(line.msgid);
  b.historyDone = false;            // lines left the page: scrolling up brings them back
}

function info(text, name, kind) {
  addLine(name || state.current, {kind: kind || "info", text});
}

// The list is updated in place, never rebuilt: a busy room renders it with every line, and a button
// replaced between a press and its release would swallow the click.
function renderRooms() {
  const list = $("rooms");
  const stale = new Map([...list.children].map(item => [item.dataset.key, item]));
  state.order.forEach((key, index) => {
    const b = state.buffers.get(key);
    const item = stale.get(key) || roomItem(key);
    stale.delete(key);
    const [number, name, unread] = item.firstChild.children;
    item.firstChild.dataset.room = b.name;
    item.firstChild.setAttribute("aria-current", String(key === state.current));
    number.textContent = index < 9 ? String(index + 1) : "";
    name.textContent = b.kind === "server" ? "Server" : b.name;
    unread.className = "unread" + (b.mentions ? " mention" : "");
    unread.textContent = b.unread ? String(b.unread) : "";
    if (b.unread) unread.setAttribute("aria-label", `${b.unread} unread${b.mentions ? `, ${b.mentions} mentioning you` : ""}`);
    else unread.removeAttribute("aria-label");
    if (list.children[index] !== item) list.insertBefore(item, list.children[index] || null);
  });
  stale.forEach(item => item.remove());
  const total = [...state.buffers.values()].reduce((sum, b) => sum + b.unread, 0);
  document.title = (total ? `(${total}) ` : "") + "pyChat";
}

function roomItem(key) {
  const item = element("li");
  item.dataset.key = key;
  const button = element("button");
  button.type = "button";
  button.append(element("span", "key"), element("span", "name"), element("span", "unread"));
  button.addEventListener("click", () => { switchTo(key); closeDrawer(); $("input").focus(); });
  item.append(button);
  return item;
}

function renderHeader() {
  const b = state.buffers.get(state.current);
  $("title").textContent = !b ? "" : b.kind === "server" ? "Server" : b.name;
  $("topic").textContent = b && b.topic ? plain(b.topic) : "";
  $("topic").title = $("topic").textContent;
  $("app").classList.toggle("no-members", !b || b.kind !== "channel");
}

function renderMembers() {
  const b = state.buffers.get(state.current);
  const list = $("member-list");
  list.replaceChildren();
  if (!b || b.kind !== "channel") return;
  const members = [...b.members.values()].sort((x, y) =>
    (y.op - x.op) || lower(x.nick).localeCompare(lower(y.nick)));
  $("members-title").textContent = `Members (${members.length})`;
  for (const member of members) {
    const item = element("li", member.away ? "away" : "");
    item.append(element("span", nickClass(member.nick), (member.op ? "@" : "") + member.nick));
    if (member.away) item.title = "away";
    list.append(item);
  }
}

function switchTo(key) {
  const input = $("input");
  const old = state.buffers.get(state.current);
  if (old) saveDraft(old, input.value);
  if (!state.buffers.has(key)) key = SERVER_BUFFER;
  state.current = key;
  const b = state.buffers.get(key);
  b.unread = 0;
  b.mentions = 0;
  const log = $("log");
  log.replaceChildren(...b.lines.map(lineElement));
  markDays(log);
  log.scrollTop = log.scrollHeight;
  input.value = b.draft;
  state.completion = null;
  renderRooms();
  renderHeader();
  renderMembers();
  HISTORY.shown(b);
}

function saveDraft(b, text) {
  b.draft = text;
  const key = "pychat.draft." + lower(b.name);
  if (text) sessionStorage.setItem(key, text); else sessionStorage.removeItem(key);
}

function setStatus(text, trouble) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("trouble", Boolean(trouble));
}

// Desktop notifications: asked for with a button (browsers want a click), shown while the tab is hidden.
function notify(target, line) {
  if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") return;
  const title = target.kind === "query" ? `${line.nick} (private)` : `${line.nick} in ${target.name}`;
  const shown = new Notification(title, {body: line.text.slice(0, 200), tag: "pychat-" + lower(target.name)});
  shown.onclick = () => { window.focus(); switchTo(lower(target.name)); shown.close(); };
}

function offerNotifications() {
  const button = $("notify");
  button.hidden = !("Notification" in window) || Notification.permission !== "default";
  button.onclick = () => Notification.requestPermission().then(offerNotifications);
}

function openDrawer() { $("app").classList.add("drawer-open"); $("menu").setAttribute("aria-expanded", "true"); }
function closeDrawer() { $("app").classList.remove("drawer-open"); $("menu").setAttribute("aria-expanded", "false"); }

// -- history -------------------------------------------------------------------------------------------
// With draft/chathistory the server replays nothing at JOIN: the client asks for a conversation's latest
// lines when it joins a room (and for the private conversations CHATHISTORY TARGETS names), and for older
// ones when the person scrolls to the top. The answers come in chathistory batches, matched to the request by
// their label (labeled-response) or else in the order asked. With draft/read-marker, the server says where
// the account has read up to in each room (MARKREAD at JOIN, and whenever another session moves it): the
// divider "new since you left" goes before the first line after it, and the client moves it forward when the
// person looks at the newest lines.

const PAGE = 50;                  // lines a history request asks for
const MARK_DELAY = 500;           // ms the view must stay still before its read position is sent
const DIVIDER_TEXT = "New since you left";

/** A message's id without the "-N" of a long line's later pieces: what a msgid= reference names. */
function baseId(msgid) { return String(msgid).replace(/-\d+$/, ""); }

function atBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
}

/** The buffer's chat lines (those with an id), oldest first. */
function chatLines(b) { return b.lines.filter(line => line.msgid); }

const HISTORY = {
  capabilities: ["batch", "labeled-response", "draft/chathistory", "draft/read-marker"],
  batches: new Map(),             // open batches by reference: {type, target, request, messages}
  requests: new Map(),            // requests waiting for their batch, by label
  queues: new Map(),              // or, without labeled-response, by lower-case target, in the order sent
  labels: 0,
  markTimer: null,
  waiting: false,                 // a look at the view is due (the tests wait for it)

  /** A new connection: nothing is pending, and every buffer's latest lines are to be asked for again. */
  reset() {
    this.batches.clear();
    this.requests.clear();
    this.queues.clear();
    for (const b of state.buffers.values()) { b.fetched = false; b.older = false; }
  },

  on() { return state.caps.has("draft/chathistory"); },

  request(b, kind, ...params) {
    const request = {key: lower(b.name), kind};
    const line = formatMessage("CHATHISTORY", ...params);
    if (state.caps.has("labeled-response") && state.caps.has("batch")) {
      const label = "h" + (++this.labels);
      this.requests.set(label, request);
      send(`@label=${label} ${line}`);
    } else {
      const queue = this.queues.get(request.key) || [];
      queue.push(request);
      this.queues.set(request.key, queue);
      send(line);
    }
  },

  /** Ask for B's latest lines (once a connection), when the server keeps history. */
  latest(b) {
    if (!this.on() || b.fetched || b.kind === "server") return;
    b.fetched = true;
    this.request(b, "latest", "LATEST", b.name, "*", String(PAGE));
  },

  /** The person scrolled to the top of B: the lines before the oldest shown, unless none are left. */
  older(b) {
    if (!b || !this.on() || b.kind === "server" || b.older || b.historyDone || !b.fetched) return;
    const oldest = chatLines(b)[0];
    if (!oldest) return;
    b.older = true;
    this.request(b, "before", "BEFORE", b.name, "msgid=" + baseId(oldest.msgid), String(PAGE));
  },

  /** B is shown: ask for what it lacks, and say it is read if the person sees its end. */
  shown(b) {
    if (b.kind === "query") this.latest(b);
    this.look();
  },

  /** After registering: the private conversations with lines in the last weeks, from history. */
  registered() {
    if (!this.on()) return;
    const from = new Date(Date.now() - 30 * 86400000).toISOString();
    const to = new Date(Date.now() + 86400000).toISOString();
    send(formatMessage("CHATHISTORY", "TARGETS", "timestamp=" + from, "timestamp=" + to, String(PAGE)));
  },

  batchStart(m) {
    const reference = m.params[0].slice(1);
    const type = m.params[1] || "";
    const batch = {type, target: m.params[2] || "", messages: [], request: null,
                   collect: type === "chathistory" || type === "draft/chathistory-targets"};
    if (type === "chathistory") {
      if (m.tags.label) {
        batch.request = this.requests.get(m.tags.label) || null;
        this.requests.delete(m.tags.label);
      } else {
        const queue = this.queues.get(lower(batch.target)) || [];
        batch.request = queue.shift() || null;
      }
    }
    this.batches.set(reference, batch);
  },

  /** A line tagged with a batch we collect: kept for the batch's end. True when it was taken. */
  take(m) {
    const batch = this.batches.get(m.tags.batch);
    if (!batch || !batch.collect) return false;
    batch.messages.push(m);
    return true;
  },

  batchEnd(m) {
    const reference = m.params[0].slice(1);
    const batch = this.batches.get(reference);
    this.batches.delete(reference);
    if (!batch) return;
    if (batch.type === "draft/chathistory-targets") {
      for (const line of batch.messages) {
        const name = line.params[1];
        if (line.command !== "CHATHISTORY" || !name || isChannel(name) || lower(name) === lower(SERVICE)) continue;
        const b = buffer(name, "query");
        send(formatMessage("MARKREAD", b.name));      // where we read up to, before its lines come
        this.latest(b);
      }
    } else if (batch.type === "chathistory") {
      this.arrived(batch);
    }
  },

  /** A FAIL CHATHISTORY: its request is over (a guest's conversation gone, a request too many...). */
  failed(m) {
    let request = null;
    if (m.tags.label) {
      request = this.requests.get(m.tags.label);
      this.requests.delete(m.tags.label);
    } else if (m.params[3]) {
      request = (this.queues.get(lower(m.params[3])) || []).shift();
    }
    const b = request && state.buffers.get(request.key);
    if (b && request.kind === "before") b.older = false;
  },

  /** A chathistory batch: its lines, in order, where they belong, each shown once. */
  arrived(batch) {
    const key = batch.request ? batch.request.key : lower(batch.target);
    const b = state.buffers.get(key);
    if (!b) return;
    const kind = batch.request ? batch.request.kind : "latest";
    const lines = [];
    for (const m of batch.messages) {
      if (m.command !== "PRIVMSG" && m.command !== "NOTICE") continue;
      const found = chatLine(m, m.command === "NOTICE", true);
      if (found && found.line.msgid) lines.push(found.line);
    }
    const messages = new Set(lines.map(line => baseId(line.msgid))).size;
    if (kind === "before") {
      b.older = false;
      if (messages < PAGE) b.historyDone = true;
      this.prepend(b, lines.filter(line => !b.msgids.has(line.msgid)));
    } else {
      this.merge(b, lines, messages);
    }
  },

  /** Older lines go before the others; the view keeps its place. */
  prepend(b, fresh) {
    for (const line of fresh) b.msgids.add(line.msgid);
    b.lines.unshift(...fresh);
    if (lower(b.name) !== state.current || !fresh.length) return;
    const log = $("log");
    const fromBottom = log.scrollHeight - log.scrollTop;
    const fragment = document.createDocumentFragment();
    fresh.forEach(line => fragment.append(lineElement(line)));
    log.prepend(fragment);
    markDays(log);
    log.scrollTop = log.scrollHeight - fromBottom;
    // Still at the top (the lines do not fill the view): more, if there are any.
    if (log.scrollTop < 2) this.older(b);
  },

  /** The latest lines of B: merged by time with those shown, the divider before the first line unread. */
  merge(b, lines, messages) {
    const known = chatLines(b);
    const overlap = lines.some(line => b.msgids.has(line.msgid));
    if (messages < PAGE) {
      b.historyDone = true;             // the conversation has no more than these
    } else if (known.length && !overlap && lines[0].time > known[known.length - 1].time) {
      // More was said while we were away than one page holds: a gap. Keep only what follows it.
      const first = lines[0].time;
      for (const line of b.lines) if (line.time < first) forgetLine(b, line);
      b.lines = b.lines.filter(line => line.time >= first);
      b.historyDone = false;
    }
    const fresh = lines.filter(line => !b.msgids.has(line.msgid));
    for (const line of fresh) b.msgids.add(line.msgid);
    b.lines = [...fresh, ...b.lines.filter(line => line.kind !== "divider")]
      .sort((x, y) => x.time - y.time);
    // The divider, and the unread counts from the lines after it.
    let unread = 0, mentioned = 0;
    if (b.readAt) {
      const first = b.lines.findIndex(line => line.msgid && line.time > b.readAt);
      if (first >= 0) {
        b.lines.splice(first, 0, {kind: "divider", text: DIVIDER_TEXT, time: b.lines[first].time});
        for (const line of b.lines.slice(first + 1)) {
          if (!line.msgid || line.mine || isLaterPiece(b, line)) continue;
          line.counts = true;
          unread += 1;
          if (line.mention) mentioned += 1;
        }
      }
    }
    const shown = lower(b.name) === state.current;
    if (!shown) {
      b.unread = Math.max(b.unread, unread);
      b.mentions = Math.max(b.mentions, mentioned);
      renderRooms();
      return;
    }
    const log = $("log");
    const bottom = atBottom();
    log.replaceChildren(...b.lines.map(lineElement));
    markDays(log);
    if (bottom) log.scrollTop = log.scrollHeight;
    this.look();
  },

  /** MARKREAD from the server: where the account has read up to in a room or conversation. Lines up to it
  are read, on every session: they no longer count as unread. */
  markread(m) {
    const [name, position = "*"] = m.params;
    const b = name && state.buffers.get(lower(name));
    if (!b || !position.startsWith("timestamp=")) return;
    const at = new Date(position.slice(10));
    if (isNaN(at) || (b.readAt && at <= b.readAt)) return;
    b.readAt = at;
    const left = b.lines.filter(line => line.counts && line.time > at);
    b.unread = Math.min(b.unread, left.length);
    b.mentions = Math.min(b.mentions, left.filter(line => line.mention).length);
    renderRooms();
  },

  /** The person may be reading: the current buffer shown, the tab visible and focused, its end in view. Then,
  once the view stays so for a moment, the newest line is read, and the server told (only forward). */
  look() {
    if (!state.caps.has("draft/read-marker")) return;
    clearTimeout(this.markTimer);
    this.waiting = true;
    this.markTimer = setTimeout(() => this.mark(), MARK_DELAY);
  },

  mark() {
    this.waiting = false;
    const b = state.buffers.get(state.current);
    if (!b || b.kind === "server" || document.hidden || !document.hasFocus() || !atBottom()) return;
    if (b.kind === "channel" && !b.joined) return;
    const lines = chatLines(b);
    const newest = lines[lines.length - 1];
    if (!newest || !newest.stamp) return;
    if ((b.readAt && newest.time <= b.readAt) || (b.marked && newest.time <= b.marked)) return;
    b.marked = newest.time;
    send(formatMessage("MARKREAD", b.name, "timestamp=" + newest.stamp));
  },
};

// -- the connection ------------------------------------------------------------------------------------

const RETRY_FIRST = 1000, RETRY_MOST = 30000;

function socketAddress() {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/socket";
}

function send(line) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) {
    state.socket.send(line);
    return true;
  }
  info("Not connected: that was not sent.", null, "error");
  return false;
}

function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  stopCountdown();
  $("reconnect").hidden = true;
  state.closing = false;
  state.fatal = "";
  state.registered = false;
  state.caps = new Set();
  HISTORY.reset();
  setStatus("Connecting…");
  let socket;
  try {
    socket = new WebSocket(socketAddress(), ["text.ircv3.net"]);
  } catch (problem) {
    disconnected(String(problem));
    return;
  }
  state.socket = socket;
  let opened = false;
  socket.onopen = () => {
    opened = true;
    setStatus("Signing in…");
    send("CAP LS 302");
    if (state.wanted.serverPassword) send(formatMessage("PASS", state.wanted.serverPassword));
    send(formatMessage("NICK", state.wanted.nick));
    send(formatMessage("USER", "web", "0", "*", state.wanted.nick));
  };
  socket.onmessage = event => {
    // After /quit, what the server still sends before it closes is the signed-out person's.
    if (typeof event.data !== "string" || state.socket !== socket || state.closing) return;
    const message = parseMessage(event.data);
    const handler = HANDLERS[message.command];
    try {
      if (message.tags.batch && HISTORY.take(message)) return;
      if (handler) handler(message); else unhandled(message);
    } catch (problem) {
      console.error("handling", event.data, problem);
    }
  };
  socket.onclose = event => {
    if (state.socket !== socket) return;
    state.socket = null;
    if (event.code === 1006 && !opened) refusedWhy().then(disconnected);
    else disconnected(event.reason || (event.code === 1006 ? "connection lost" : `closed (${event.code})`));
  };
}

/** Why the socket did not open: a browser tells a page nothing of a refused handshake, so the page asks the
 * door again, in plain HTTP, and reads the refusal (banned, the server or the address full). A door that lets
 * it in answers that /socket is a WebSocket (426): then the connection was lost, or refused no longer. */
async function refusedWhy() {
  try {
    const answer = await fetch("/socket", {cache: "no-store", credentials: "omit"});
    if (answer.status === 426 || answer.ok) return "connection lost";
    const why = (await answer.text()).trim().slice(0, 300);
    if (answer.status === 403) state.fatal = why;      // banned: trying again will not help
    return why || `refused (${answer.status})`;
  } catch (_) {
    return "connection lost";
  }
}

function disconnected(why) {
  for (const b of state.buffers.values()) { b.joined = false; b.members.clear(); }
  renderMembers();
  if (state.closing) { setStatus("Signed out."); return; }
  if (state.fatal || !state.registered && state.signedOut) {
    signOut(state.fatal || `Could not sign in: ${why}.`);
    return;
  }
  const delay = Math.min(RETRY_MOST, RETRY_FIRST * 2 ** state.attempts) * (0.75 + Math.random() / 2);
  state.attempts += 1;
  const until = Date.now() + delay;
  const tick = () => {
    const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    setStatus(`Disconnected (${why}); reconnecting in ${left} s`, true);
  };
  tick();
  stopCountdown();
  // Kept in state: a reconnection started elsewhere (the browser's "online") stops it too.
  state.countdown = setInterval(tick, 1000);
  $("reconnect").hidden = false;
  state.retryTimer = setTimeout(connect, delay);
  $("reconnect").onclick = () => connect();
  info(`Disconnected: ${why}.`, SERVER_BUFFER, "error");
}

function stopCountdown() {
  clearInterval(state.countdown);
  state.countdown = null;
}

function signOut(why) {
  state.signedOut = true;
  $("app").classList.add("signed-out");
  $("signin-error").textContent = why || "";
  $("signin-button").disabled = false;
  setStatus("");
  $("nick").focus();
}

function signIn(event) {
  event.preventDefault();
  state.wanted = {nick: $("nick").value.trim(), password: $("password").value,
                  serverPassword: $("server-password").value, code: $("code").value.trim()};
  if (!state.wanted.nick) return;
  if (state.wanted.code && !state.wanted.password) {
    $("signin-error").textContent = "With a code, choose your account's password too.";
    $("password").focus();
    return;
  }
  localStorage.setItem("pychat.nick", state.wanted.nick);
  // The rooms, conversations and drafts of this tab are the last person's: someone else's are not shown.
  const last = sessionStorage.getItem("pychat.person");
  if (last !== null && lower(last) !== lower(state.wanted.nick)) forgetPerson();
  sessionStorage.setItem("pychat.person", state.wanted.nick);
  $("signin-error").textContent = "";
  $("signin-button").disabled = true;
  state.attempts = 0;
  connect();
}

// -- what the server says ------------------------------------------------------------------------------

function timeOf(message) {
  const stamp = message.tags.time ? new Date(message.tags.time) : null;
  return stamp && !isNaN(stamp) ? stamp : new Date();
}

function mentions(text) {
  if (!state.nick) return false;
  const escaped = state.nick.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  return new RegExp(`(^|[^\\p{L}\\p{N}_-])${escaped}($|[^\\p{L}\\p{N}_-])`, "iu").test(text);
}

function isMe(nick) { return nick && lower(nick) === lower(state.nick); }

function eventLine(name, text, time) { addLine(name, {kind: "event", text, time}); }

function registered(message) {
  state.nick = message.params[0];
  state.registered = true;
  state.signedOut = false;
  state.attempts = 0;
  stopCountdown();
  $("app").classList.remove("signed-out");
  $("reconnect").hidden = true;
  setStatus(`Connected as ${state.nick}`);
  offerNotifications();
  const rooms = JSON.parse(sessionStorage.getItem("pychat.rooms") || "[]");
  const wanted = rooms.filter(room => !(state.buffers.get(lower(room)) || {}).joined);
  if (wanted.length) send(formatMessage("JOIN", wanted.join(",")));
  HISTORY.registered();
  $("input").focus();
}

/** A PRIVMSG or NOTICE as {where, line}: the buffer it belongs to and the line to show; null for what is not
shown (CTCP other than ACTION). FROM_HISTORY: a line of a chathistory batch, never answered. */
function chatLine(message, notice, fromHistory) {
  const [target, raw = ""] = message.params;
  const from = message.nick || "";
  let text = plain(raw);
  // The server's own notices and pyChat's replies to commands (from its service) go where the person is.
  if (!message.source || !message.source.includes("!") || lower(from) === lower(SERVICE)) {
    if (fromHistory) return null;
    return {where: state.registered ? state.current : SERVER_BUFFER, line: {kind: "info", text, time: timeOf(message)}};
  }
  let kind = notice ? "notice" : "message";
  if (text.startsWith("\x01")) {
    const ctcp = text.replace(/^\x01|\x01$/g, "");
    if (!ctcp.startsWith("ACTION")) {
      if (!fromHistory && !notice && ctcp.split(" ")[0] === "VERSION") send(formatMessage("NOTICE", from, "\x01VERSION pyChat web\x01"));
      return null;
    }
    text = ctcp.slice(7);
    kind = "action";
  }
  const mine = isMe(from);
  // A channel's line goes to the channel; a private one to the conversation with the other person (our own
  // come back to us with echo-message); someone's notice to us, to the conversation if there is one.
  let where = isChannel(target) || mine ? target : from;
  if (!fromHistory && notice && !isChannel(target) && !state.buffers.has(lower(where))) where = state.current;
  // Lines replayed at JOIN (by a server without draft/chathistory) are history: shown, but not news.
  const old = fromHistory || Boolean(message.tags.time) && Date.now() - timeOf(message) > 10000;
  return {where, line: {kind, nick: from, text, time: timeOf(message), counts: !mine && !old, mine,
                        msgid: message.tags.msgid || null, stamp: message.tags.time || null,
                        mention: !mine && isChannel(target) && mentions(text)}};
}

function privmsg(message, notice) {
  const found = chatLine(message, notice, false);
  if (found) addLine(found.where, found.line);
}

function names(message) {
  const b = buffer(message.params[2]);
  if (!b.namesComplete) { b.members.clear(); b.namesComplete = true; }
  for (const entry of (message.params[3] || "").split(" ").filter(Boolean)) {
    const op = entry.startsWith("@");
    const nick = entry.replace(/^[@+]+/, "").split("!")[0];
    b.members.set(lower(nick), {nick, op, away: false});
  }
}

function markAway(nick, away) {
  forEachRoomOf(nick, b => { b.members.get(lower(nick)).away = away; });
  renderMembers();
}

function forEachRoomOf(nick, act) {
  for (const b of state.buffers.values()) {
    if (b.kind === "channel" && b.members.has(lower(nick))) act(b);
  }
}

function numericReply(message) {
  // Every other numeric: its text, in the buffer shown; errors in red.
  const text = message.params.slice(1).join(" ");
  const error = /^[45]/.test(message.command);
  if (!state.registered && ["432", "433", "436", "464", "465", "902", "904"].includes(message.command)) {
    // A wrong password is final; a name taken is final at the first sign-in, and on a reconnection is
    // probably our own old connection, which the server lets go soon: the reconnection tries again.
    if (["464", "465", "904", "902"].includes(message.command) || state.signedOut && ["432", "433"].includes(message.command)) {
      state.fatal = message.params[message.params.length - 1];
    }
    send("QUIT");
    return;
  }
  info(text, state.registered ? null : SERVER_BUFFER, error ? "error" : "info");
}

/** The code did its work: the account is made or has its new password, and this connection is signed in
 * to it. The code is spent, so a reconnection signs in with the password. */
function accountMade() {
  state.wanted.code = "";
  state.registering = false;
  $("code").value = "";
  send("CAP END");
}

function unhandled(message) {
  if (/^\d{3}$/.test(message.command)) numericReply(message);
}

const HANDLERS = {
  PING: m => send(formatMessage("PONG", ...m.params)),
  CAP: m => {
    const sub = (m.params[1] || "").toUpperCase();
    if (sub === "LS") {
      const offered = new Set((m.params[m.params.length - 1] || "").split(" ").map(c => c.split("=")[0]));
      const more = m.params[2] === "*";
      state.offered = new Set([...(state.offered || []), ...offered]);
      if (more) return;
      const wanted = [...WANTED_CAPS, ...HISTORY.capabilities].filter(c => state.offered.has(c));
      state.registering = Boolean(state.wanted.code) && state.offered.has("draft/account-registration");
      if (state.wanted.password && !state.registering && state.offered.has("sasl")) wanted.push("sasl");
      state.offered = null;
      if (wanted.length && !state.registered) send(formatMessage("CAP", "REQ", wanted.join(" ")));
      else if (!state.registered) send("CAP END");
    } else if (sub === "ACK") {
      const acked = (m.params[2] || "").split(" ").filter(Boolean);
      for (const cap of acked) {
        if (cap.startsWith("-")) state.caps.delete(cap.slice(1)); else state.caps.add(cap);
      }
      if (state.registered) return;
      // A code makes the account (or gives it the new password): REGISTER, then VERIFY with the code.
      if (state.registering) send(formatMessage("REGISTER", "*", "*", state.wanted.password));
      else if (state.caps.has("sasl")) send("AUTHENTICATE PLAIN"); else send("CAP END");
    } else if (sub === "NAK" && !state.registered) {
      send("CAP END");
    } else if (sub === "NEW" && state.registered) {
      const wanted = [...WANTED_CAPS, ...HISTORY.capabilities].filter(c => (m.params[2] || "").split(" ").includes(c));
      if (wanted.length) send(formatMessage("CAP", "REQ", wanted.join(" ")));
    }
  },
  AUTHENTICATE: m => {
    if (m.params[0] !== "+") return;
    const {nick, password} = state.wanted;
    send(formatMessage("AUTHENTICATE", base64(`${nick}\0${nick}\0${password}`)));
  },
  "903": () => send("CAP END"),
  "904": m => { state.fatal = "Wrong nickname or password."; send("CAP END"); send("QUIT"); },
  REGISTER: m => {
    if (state.registered) { info(m.params.slice(2).join(" ")); return; }
    if (m.params[0] === "VERIFICATION_REQUIRED") send(formatMessage("VERIFY", m.params[1], state.wanted.code));
    else if (m.params[0] === "SUCCESS") accountMade();
  },
  VERIFY: m => { if (m.params[0] === "SUCCESS" && !state.registered) accountMade(); },
  "001": registered,
  "PRIVMSG": m => privmsg(m, false),
  "NOTICE": m => privmsg(m, true),
  JOIN: m => {
    const room = m.params[0];
    const b = buffer(room, "channel");
    if (isMe(m.nick)) {
      state.userHost = m.source.slice(m.nick.length);
      b.joined = true;
      b.members.clear();
      b.namesComplete = false;
      rememberRooms();
      if (state.current === SERVER_BUFFER || state.switchOnJoin === lower(room)) {
        state.switchOnJoin = null;
        switchTo(lower(room));
      }
      eventLine(room, `You joined ${room}`, timeOf(m));
      b.fetched = false;              // back after a kick: what was said meanwhile is in the latest lines
      HISTORY.latest(b);
      return;
    }
    b.members.set(lower(m.nick), {nick: m.nick, op: false, away: false});
    eventLine(room, `${m.nick} joined`, timeOf(m));
    if (lower(room) === state.current) renderMembers();
  },
  PART: m => {
    const [room, reason] = m.params;
    if (isMe(m.nick)) {
      const b = buffer(room);
      b.joined = false;
      b.members.clear();
      rememberRooms();
      dropBuffer(room);
      return;
    }
    buffer(room).members.delete(lower(m.nick));
    eventLine(room, `${m.nick} left${reason ? ` (${plain(reason)})` : ""}`, timeOf(m));
    if (lower(room) === state.current) renderMembers();
  },
  KICK: m => {
    const [room, who, reason] = m.params;
    const b = buffer(room);
    b.members.delete(lower(who));
    if (isMe(who)) { b.joined = false; b.members.clear(); rememberRooms(); }
    addLine(room, {kind: isMe(who) ? "error" : "event", time: timeOf(m),
                   text: `${isMe(who) ? "You were" : who + " was"} kicked by ${m.nick}${reason ? ` (${plain(reason)})` : ""}`});
    if (lower(room) === state.current) renderMembers();
  },
  QUIT: m => {
    forEachRoomOf(m.nick, b => {
      b.members.delete(lower(m.nick));
      eventLine(b.name, `${m.nick} quit${m.params[0] ? ` (${plain(m.params[0])})` : ""}`, timeOf(m));
    });
    renderMembers();
  },
  NICK: m => {
    const next = m.params[0];
    if (isMe(m.nick)) { state.nick = next; setStatus(`Connected as ${next}`); }
    forEachRoomOf(m.nick, b => {
      const old = b.members.get(lower(m.nick));
      b.members.delete(lower(m.nick));
      b.members.set(lower(next), {...old, nick: next});
      eventLine(b.name, `${m.nick} is now ${next}`, timeOf(m));
    });
    const query = state.buffers.get(lower(m.nick));
    if (query && query.kind === "query" && !state.buffers.has(lower(next))) {
      state.buffers.delete(lower(m.nick));
      query.name = next;
      state.buffers.set(lower(next), query);
      state.order = state.order.map(k => k === lower(m.nick) ? lower(next) : k);
      if (state.current === lower(m.nick)) state.current = lower(next);
      renderRooms();
      renderHeader();
    }
    renderMembers();
  },
  TOPIC: m => {
    const [room, topic = ""] = m.params;
    buffer(room).topic = topic;
    eventLine(room, `${m.nick} set the topic: ${plain(topic)}`, timeOf(m));
    renderHeader();
  },
  "332": m => { buffer(m.params[1]).topic = m.params[2] || ""; renderHeader(); },
  "331": m => { buffer(m.params[1]).topic = ""; renderHeader(); },
  "333": () => {},
  "353": names,
  "366": m => {
    const b = buffer(m.params[1]);
    b.namesComplete = false;
    if (lower(b.name) === state.current) renderMembers();
  },
  AWAY: m => markAway(m.nick, Boolean(m.params[0])),
  MODE: m => {
    const [room, change, who] = m.params;
    if (!isChannel(room)) return;
    const member = who && buffer(room).members.get(lower(who));
    if (member && (change === "+o" || change === "-o")) member.op = change === "+o";
    eventLine(room, `${m.nick} sets mode ${m.params.slice(1).join(" ")}`, timeOf(m));
    renderMembers();
  },
  INVITE: m => info(`${m.nick} invites you to ${m.params[1]}: /join ${m.params[1]}`, null),
  ERROR: m => {
    if (!state.registered && state.signedOut && !state.fatal) state.fatal = m.params[0] || "";
    info(m.params[0] || "Closed by the server", SERVER_BUFFER, "error");
  },
  "305": m => { markAway(state.nick, false); info(m.params[1] || "You are back", null); },
  "306": m => { markAway(state.nick, true); info(m.params[1] || "You are away", null); },
  "301": m => addLine(state.buffers.has(lower(m.params[1])) ? m.params[1] : state.current,
                      {kind: "info", text: `${m.params[1]} is away: ${m.params[2] || ""}`}),
  "372": m => info(m.params[1] || "", SERVER_BUFFER),
  "422": m => info(m.params[1] || "", SERVER_BUFFER),       // no message of the day: not news for a room
  "375": () => {}, "376": () => {}, "002": () => {}, "003": () => {}, "004": () => {}, "005": () => {},
  "251": () => {}, "252": () => {}, "253": () => {}, "254": () => {}, "255": () => {}, "265": () => {}, "266": () => {},
  "900": () => {},
  BATCH: m => {
    const reference = m.params[0] || "";
    if (reference.startsWith("+")) HISTORY.batchStart(m);
    else if (reference.startsWith("-")) HISTORY.batchEnd(m);
  },
  MARKREAD: m => HISTORY.markread(m),
  FAIL: m => {
    const why = m.params[m.params.length - 1];
    if (m.params[0] === "CHATHISTORY") HISTORY.failed(m);
    else if (!state.registered && ["REGISTER", "VERIFY"].includes(m.params[0])) { state.fatal = why; send("QUIT"); }
    else info(why, null, "error");
  },
  ACK: () => {},
};

// -- what the person types -----------------------------------------------------------------------------

const COMMANDS = {
  join: {usage: "/join #room [key]", help: "join a room (or make one)", run: args => {
    if (!args[0]) return usage("join");
    const room = isChannel(args[0]) ? args[0] : "#" + args[0];
    state.switchOnJoin = lower(room);
    if (state.buffers.get(lower(room))?.joined) switchTo(lower(room));
    else send(formatMessage("JOIN", room, ...args.slice(1)));
  }},
  part: {usage: "/part [#room] [reason]", help: "leave a room (this one by default)", run: (args, rest) => {
    const b = state.buffers.get(state.current);
    if (args[0] && isChannel(args[0])) return send(formatMessage("PART", args[0], ...(args[1] ? [rest.slice(args[0].length).trim()] : [])));
    if (!b || b.kind !== "channel") { if (b && b.kind === "query") dropBuffer(b.name); return; }
    send(formatMessage("PART", b.name, ...(rest ? [rest] : [])));
  }},
  msg: {usage: "/msg NICK text", help: "a private message", run: (args, rest) => {
    if (args.length < 2) return usage("msg");
    const text = rest.slice(args[0].length).trim();
    say(args[0], text);
    if (!isChannel(args[0]) && lower(args[0]) !== lower(SERVICE)) switchTo(lower(buffer(args[0]).name));
  }},
  query: {usage: "/query NICK", help: "open a private conversation", run: args => {
    if (!args[0]) return usage("query");
    switchTo(lower(buffer(args[0]).name));
  }},
  me: {usage: "/me action", help: "say what you do", run: (args, rest) => {
    const b = state.buffers.get(state.current);
    if (!b || b.kind === "server" || !rest) return usage("me");
    for (const piece of messagePieces(b.name, rest, byteLength("\x01ACTION \x01"))) {
      if (send(formatMessage("PRIVMSG", b.name, `\x01ACTION ${piece}\x01`)) && !state.caps.has("echo-message"))
        addLine(b.name, {kind: "action", nick: state.nick, text: piece});
    }
  }},
  nick: {usage: "/nick NAME", help: "change your nickname", run: args => args[0] ? send(formatMessage("NICK", args[0])) : usage("nick")},
  topic: {usage: "/topic [text]", help: "show or set this room's topic", run: (args, rest) => {
    const b = state.buffers.get(state.current);
    if (!b || b.kind !== "channel") return info("/topic is for rooms.", null, "error");
    if (rest) send(formatMessage("TOPIC", b.name, rest));
    else info(b.topic ? `Topic: ${plain(b.topic)}` : "No topic.", null);
  }},
  away: {usage: "/away [message]", help: "say you are away (no message: back)", run: (args, rest) =>
    send(rest ? formatMessage("AWAY", rest) : "AWAY")},
  back: {usage: "/back", help: "you are back", run: () => send("AWAY")},
  close: {usage: "/close", help: "close this conversation (leaves a room)", run: () => COMMANDS.part.run([], "")},
  quit: {usage: "/quit [message]", help: "sign out", run: (args, rest) => {
    state.closing = true;
    send(formatMessage("QUIT", rest || "Quit"));
    forgetPerson();
    signOut("Signed out.");
  }},
  quote: {usage: "/quote LINE", help: "send a raw IRC line", run: (args, rest) => rest ? send(rest) : usage("quote")},
  help: {usage: "/help", help: "this list, then the server's commands", run: () => {
    info("The web client's commands:", null);
    const width = Math.max(...Object.values(COMMANDS).map(c => c.usage.length));
    for (const name of Object.keys(COMMANDS).sort()) {
      info(`  ${COMMANDS[name].usage.padEnd(width)}  ${COMMANDS[name].help}`, null);
    }
    info("Alt-1..9 switch rooms, Tab completes names. Any other /command goes to the server:", null);
    send(formatMessage("PRIVMSG", SERVICE, "help"));
  }},
};

function usage(name) { info(`Usage: ${COMMANDS[name].usage}`, null, "error"); }

/** Say TEXT to TARGET, in as many messages as it takes (a message longer than an IRC line would be refused). */
function say(target, text) {
  if (!text) return;
  for (const piece of messagePieces(target, text)) {
    if (send(formatMessage("PRIVMSG", target, piece)) && !state.caps.has("echo-message") && lower(target) !== lower(SERVICE))
      addLine(target, {kind: "message", nick: state.nick, text: piece});
  }
}

function submit(event) {
  event.preventDefault();
  const input = $("input");
  const text = input.value;
  if (!text.trim()) return;
  if (byteLength(text) > MAX_TYPED_BYTES) {         // kept in the input, to be cut
    return info(`That is ${byteLength(text)} bytes: at most ${MAX_TYPED_BYTES} are sent at once. Send it in parts.`,
                null, "error");
  }
  input.value = "";
  const b = state.buffers.get(state.current);
  saveDraft(b, "");
  state.completion = null;
  if (text.startsWith("/") && !text.startsWith("//")) {
    const rest = text.slice(1).replace(/^\S+\s*/, "");
    const name = text.slice(1).split(/\s+/)[0].toLowerCase();
    const args = rest.split(/\s+/).filter(Boolean);
    if (COMMANDS[name]) COMMANDS[name].run(args, rest);
    else send(formatMessage("PRIVMSG", SERVICE, text.slice(1)));      // pyChat's own command, through its service
    return;
  }
  const line = text.startsWith("//") ? text.slice(1) : text;
  if (!b || b.kind === "server") return info("Pick a room first (or /join #room).", null, "error");
  for (const piece of line.split("\n")) say(b.name, piece);
}

/** Tab: the names of this room's members (and open conversations) that start like the word at the cursor. */
function complete(input) {
  const b = state.buffers.get(state.current);
  let c = state.completion;
  if (!c) {
    const start = input.value.lastIndexOf(" ", input.selectionStart - 1) + 1;
    const prefix = input.value.slice(start, input.selectionStart);
    if (!prefix) return;
    const pool = new Set([...(b ? [...b.members.values()].map(m => m.nick) : []),
                          ...[...state.buffers.values()].filter(x => x.kind !== "server").map(x => x.name)]);
    const matches = [...pool].filter(n => lower(n).startsWith(lower(prefix)) && !isMe(n)).sort();
    if (!matches.length) return;
    c = state.completion = {start, matches, index: -1, end: input.selectionStart};
  }
  c.index = (c.index + 1) % c.matches.length;
  const word = c.matches[c.index] + (c.start === 0 && !c.matches[c.index].startsWith("#") ? ": " : " ");
  input.value = input.value.slice(0, c.start) + word + input.value.slice(c.end);
  c.end = c.start + word.length;
  input.setSelectionRange(c.end, c.end);
}

function keydown(event) {
  if (event.altKey && /^Digit[1-9]$/.test(event.code)) {
    const key = state.order[Number(event.code.slice(5)) - 1];
    if (key) { event.preventDefault(); switchTo(key); $("input").focus(); }
    return;
  }
  if (event.target === $("input")) {
    if (event.key === "Tab" && !event.shiftKey && !event.ctrlKey && !event.altKey) {
      if ($("input").value) { event.preventDefault(); complete($("input")); }
      return;
    }
    state.completion = null;
  }
  if (event.key === "Escape") closeDrawer();
}

function start() {
  buffer(SERVER_BUFFER, "server");
  state.current = SERVER_BUFFER;
  $("nick").value = localStorage.getItem("pychat.nick") || "";
  $("signin").addEventListener("submit", signIn);
  $("compose").addEventListener("submit", submit);
  $("input").addEventListener("input", () => {
    const b = state.buffers.get(state.current);
    if (b) saveDraft(b, $("input").value);
  });
  $("join-form").addEventListener("submit", event => {
    event.preventDefault();
    const room = $("join-room").value.trim();
    $("join-room").value = "";
    if (room) COMMANDS.join.run([room], room);
    closeDrawer();
  });
  $("menu").addEventListener("click", () => $("app").classList.contains("drawer-open") ? closeDrawer() : openDrawer());
  $("scrim").addEventListener("click", closeDrawer);
  $("members-button").addEventListener("click", () => {
    const hidden = $("app").classList.toggle("no-members");
    $("members-button").setAttribute("aria-expanded", String(!hidden));
  });
  $("log").addEventListener("scroll", () => {
    if ($("log").scrollTop < 2) HISTORY.older(state.buffers.get(state.current));
    HISTORY.look();
  });
  window.addEventListener("focus", () => HISTORY.look());
  document.addEventListener("keydown", keydown);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) { const b = state.buffers.get(state.current); if (b) { b.unread = 0; b.mentions = 0; renderRooms(); } }
    HISTORY.look();
  });
  window.addEventListener("online", () => { if (!state.socket && !state.signedOut && !state.closing) connect(); });
  renderRooms();
  $(state.wanted.nick || $("nick").value ? "password" : "nick").focus();
}

document.addEventListener("DOMContentLoaded", start);
