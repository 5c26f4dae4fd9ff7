// A page on another origin (same host name, another port) that tries to make the signed-in
// browser POST to the proxy: once with fetch (a "simple" no-cors request, the kind a browser
// sends without a CORS preflight) and once with a plain auto-submitting HTML form. Same host
// name means same *site*, so even a SameSite=Strict cookie goes along: only the proxy's CSRF
// checks (token header, Origin / Sec-Fetch-Site) stand in the way.

import { createServer } from 'node:http';

const escapeHtml = (text) =>
  text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);

function pages(proxyUrl) {
  const target = (p) => escapeHtml(`${proxyUrl}${p}`);
  return {
    '/fetch.html': `<!doctype html><title>cross-origin fetch</title>
<h1>Cross-origin fetch</h1><pre id="log"></pre>
<script>
  const log = (line) => { document.getElementById('log').textContent += line + '\\n'; };
  async function attack() {
    for (const [path, body] of [
      ['/api/notes', JSON.stringify({ text: 'forged by fetch' })],
      ['/auth/logout', ''],
    ]) {
      try {
        const r = await fetch(${JSON.stringify(proxyUrl)} + path, {
          method: 'POST', mode: 'no-cors', credentials: 'include',
          headers: { 'Content-Type': 'text/plain' }, body,
        });
        log(path + ': sent (' + r.type + ')');
      } catch (e) {
        log(path + ': ' + e);
      }
    }
    document.title = 'done';
  }
  attack();
</script>`,
    '/form.html': `<!doctype html><title>cross-origin form</title>
<h1>Cross-origin form</h1>
<form id="f" method="POST" action="${target('/api/notes')}" enctype="text/plain">
  <input type="hidden" name='{"text":"forged by form","pad":"' value='"}'>
</form>
<script>document.getElementById('f').submit();</script>`,
    '/form-urlencoded.html': `<!doctype html><title>cross-origin form (urlencoded)</title>
<form id="f" method="POST" action="${target('/api/notes')}">
  <input type="hidden" name="text" value="forged by urlencoded form">
</form>
<script>document.getElementById('f').submit();</script>`,
  };
}

/** Serves the attack pages for `proxyUrl` on `host`, another free port. */
export async function startAttacker(proxyUrl) {
  const host = new URL(proxyUrl).hostname;
  const content = pages(proxyUrl);
  const server = createServer((req, res) => {
    const page = content[new URL(req.url, 'http://x').pathname];
    if (!page) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(page);
  });
  await new Promise((resolve) => server.listen(0, host, resolve));
  return {
    origin: `http://${host}:${server.address().port}`,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(resolve);
      }),
  };
}
