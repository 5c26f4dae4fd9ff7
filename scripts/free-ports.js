// Prints N loopback TCP ports free now, all different, on one line: `node scripts/free-ports.js 7`.
// Used by scripts/e2e.sh and deploy/compose/smoke-test.sh. The listeners are held open together
// while they are picked: picked one at a time, a port just released could be handed out twice.
// A port can still be taken by another process before the caller binds it; e2e.sh retries.
"use strict";
const net = require("net");

const count = Number(process.argv[2] ?? "1");
if (!Number.isInteger(count) || count < 1 || count > 64) {
  console.error(`free-ports.js: the count must be 1 to 64, not ${process.argv[2]}`);
  process.exit(2);
}
const servers = Array.from({ length: count }, () => net.createServer().listen(0, "127.0.0.1"));
Promise.all(servers.map((s) => new Promise((listening) => s.on("listening", listening)))).then(() => {
  console.log(servers.map((s) => s.address().port).join(" "));
  servers.forEach((s) => s.close());
});
