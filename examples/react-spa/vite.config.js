import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

// Where `countersign dev` (or `countersign run`) listens; only used by `npm run dev`.
const proxyTarget = process.env.COUNTERSIGN_URL ?? 'http://127.0.0.1:8080';

// In production the proxy serves dist/ itself (`countersign dev --static-dir dist` or
// `[server] static_dir`), so the SPA and /auth, /api share one origin and no CORS exists.
// `npm run dev` recreates that origin by forwarding /auth and /api through Vite's dev server.
const forward = {
  target: proxyTarget,
  changeOrigin: true,
  configure(proxy) {
    // The browser's Origin is Vite's (localhost:5173), which the proxy's CSRF check rightly
    // refuses; as far as the browser is concerned the request *is* same-origin, so present
    // it to the proxy with the proxy's own origin. Dev server only.
    proxy.on('proxyReq', (proxyReq) => {
      if (proxyReq.getHeader('origin')) proxyReq.setHeader('origin', proxyTarget);
    });
  },
};

export default defineConfig({
  plugins: [react()],
  server: {
    proxy: { '/auth': forward, '/api': forward },
  },
  build: {
    outDir: 'dist',
    emptyOutDir: true,
  },
});
