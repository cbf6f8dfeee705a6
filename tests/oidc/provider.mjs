// A real OpenID provider for dbops' sign-in tests: the certified `oidc-provider`
// package (installed by .ci/install-oidc-provider), configured from a state
// directory that the test writes and may change while the provider runs:
//
//   clients.json  [{ client_id, client_secret, redirect_uris, post_logout_redirect_uris }]
//   users.json    { "<login>": { "password": "...", "groups": ["..."], "email": "..." } }
//                 (read at every sign-in, so a test can change someone's groups)
//   mode          optional; changes the ID token of the next /token answers the way an
//                 attacker in the middle would: `tamper` (a claim changed, signature
//                 kept), `wrong_aud` (validly signed for another client), `none_alg`
//                 (unsigned), `none_alg_signed` (`none` with the signature kept), `expired` (validly signed, expired an hour ago)
//
// Environment: OIDC_PORT, OIDC_STATE_DIR. Each start makes a new signing key with a
// new key id, so a restart is a key rotation. Prints `ready <issuer>` when listening.
// The sign-in and consent pages are ours (minimal HTML, nothing loaded from elsewhere);
// consent is granted automatically, as for a first-party client.
//
// This file is copied next to the installed package before it runs (ES modules
// resolve packages from the script's own directory).

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import Provider from 'oidc-provider';
import * as jose from 'jose';

const port = Number(process.env.OIDC_PORT);
const dir = process.env.OIDC_STATE_DIR;
const issuer = `http://127.0.0.1:${port}`;
const readJson = (name) => JSON.parse(readFileSync(join(dir, name), 'utf8'));
const readMode = () => {
  try {
    return readFileSync(join(dir, 'mode'), 'utf8').trim();
  } catch {
    return '';
  }
};
const users = () => readJson('users.json');

const kid = randomUUID();
const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
const privateJwk = { ...(await jose.exportJWK(privateKey)), kid, alg: 'RS256', use: 'sig' };

const provider = new Provider(issuer, {
  clients: readJson('clients.json').map((c) => ({
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...c,
  })),
  jwks: { keys: [privateJwk] },
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name'],
    email: ['email'],
    groups: ['groups'],
  },
  conformIdTokenClaims: false,
  cookies: { keys: [randomUUID()] },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      logoutSource: async (ctx, form) => {
        ctx.body = `<!doctype html><title>Sign out</title>${form}
          <button form="op.logoutForm" name="logout" value="yes" type="submit">Sign out</button>`;
      },
    },
  },
  pkce: { required: () => true },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  findAccount: async (ctx, id) => {
    const u = users()[id];
    if (!u) return undefined;
    return {
      accountId: id,
      claims: async () => ({
        sub: id,
        preferred_username: id,
        name: id,
        email: u.email ?? `${id}@example.test`,
        groups: u.groups ?? [],
      }),
    };
  },
  loadExistingGrant: async (ctx) => {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid profile email groups');
    grant.addOIDCClaims(['sub', 'preferred_username', 'name', 'email', 'groups']);
    await grant.save();
    return grant;
  },
  ttl: { IdToken: 600, AccessToken: 600, AuthorizationCode: 60, Session: 3600, Interaction: 600, Grant: 3600 },
});

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const loginPage = (uid, error) => `<!doctype html><html><head><meta charset="utf-8"><title>Test provider</title></head>
<body><h1>Test provider sign-in</h1>${error ? `<p id="error">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login">
<input name="login" id="login" autofocus><input name="password" id="password" type="password">
<button type="submit" id="submit">Sign in</button></form></body></html>`;

async function readForm(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return Object.fromEntries(new URLSearchParams(body));
}

// The attacker in the middle: rewrites the ID token of a /token answer.
async function rewrite(idToken, mode) {
  const [h, p, s] = idToken.split('.');
  const payload = JSON.parse(Buffer.from(p, 'base64url').toString());
  const sign = (claims) => new jose.SignJWT(claims)
    .setProtectedHeader({ alg: 'RS256', kid })
    .sign(privateKey);
  switch (mode) {
    case 'tamper': {
      payload.groups = ['dbops-admins'];
      payload.preferred_username = 'mallory';
      return `${h}.${Buffer.from(JSON.stringify(payload)).toString('base64url')}.${s}`;
    }
    case 'wrong_aud':
      return sign({ ...payload, aud: 'another-client' });
    case 'none_alg': {
      const header = Buffer.from(JSON.stringify({ alg: 'none', typ: 'JWT' })).toString('base64url');
      return `${header}.${p}.`;
    }
    case 'none_alg_signed': {
      // `none` in the header, the real signature kept: the algorithm must decide.
      const header = Buffer.from(JSON.stringify({ alg: 'none', typ: 'JWT' })).toString('base64url');
      return `${header}.${p}.${s}`;
    }
    case 'expired': {
      const now = Math.floor(Date.now() / 1000);
      return sign({ ...payload, iat: now - 7200, exp: now - 3600 });
    }
    default:
      return idToken;
  }
}

provider.use(async (ctx, next) => {
  const m = ctx.path.match(/^\/interaction\/([^/]+)(\/login)?$/);
  if (m) {
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (ctx.method === 'GET' && details.prompt.name === 'login') {
      ctx.type = 'html';
      ctx.body = loginPage(details.uid);
      return;
    }
    if (ctx.method === 'POST' && m[2]) {
      const form = await readForm(ctx.req);
      const u = users()[form.login];
      if (!u || u.password !== form.password) {
        ctx.type = 'html';
        ctx.body = loginPage(details.uid, 'wrong login or password');
        return;
      }
      await provider.interactionFinished(ctx.req, ctx.res, { login: { accountId: form.login } }, { mergeWithLastSubmission: false });
      ctx.respond = false;
      return;
    }
    // Anything else (consent): granted by loadExistingGrant above.
    await provider.interactionFinished(ctx.req, ctx.res, { consent: {} }, { mergeWithLastSubmission: true });
    ctx.respond = false;
    return;
  }
  await next();
  const mode = readMode();
  if (mode && ctx.path === '/token' && ctx.status === 200 && ctx.body?.id_token) {
    ctx.body = { ...ctx.body, id_token: await rewrite(ctx.body.id_token, mode) };
  }
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
