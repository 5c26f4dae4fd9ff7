import { createClient } from '@countersign/client';

// One client for the whole app: it holds the CSRF token in memory for this tab. The SPA is
// served by the proxy, so every path is same-origin and baseUrl stays empty.
export const client = createClient();
