// A node:http server on a free loopback port for one test: each such server is another
// origin (its own port), and `close()` ends its open connections too, so a test that leaves
// an answer unfinished still ends.

import { createServer } from 'node:http';

/**
 * Starts a server answering with `listener(req, res)` on 127.0.0.1 and a port the OS picks.
 * Resolves to `{ origin, close }`: `origin` is `http://127.0.0.1:PORT`, `close()` resolves
 * once the server and every connection to it are closed.
 */
export async function listenLoopback(listener) {
  const server = createServer(listener);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    origin: `http://127.0.0.1:${server.address().port}`,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(resolve);
      }),
  };
}
