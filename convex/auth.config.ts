/**
 * Who may sign in to the web app's public queries (`webapp.ts`): Clerk session tokens.
 *
 * Setup, once per Clerk instance and Convex deployment:
 * 1. Clerk dashboard -> JWT templates -> New template -> "Convex". Keep its name "convex": the
 *    web app asks Clerk for a token from the template of that name, and the template sets the
 *    audience (`aud`) to "convex", which must equal `applicationID` below.
 * 2. Copy the template's Issuer (the Frontend API URL, e.g. https://example.clerk.accounts.dev)
 *    and set it on the deployment *before* the first push, which is refused while a variable
 *    read here is unset (convex-backend `crates/isolate/src/environment/auth_config.rs`):
 *    `npx convex env set CLERK_JWT_ISSUER_DOMAIN https://example.clerk.accounts.dev` sets the
 *    dev deployment's; add `--prod` (or export the production deploy key) for production's,
 *    which has its own Clerk issuer. `make convex-deploy` does this step and the next.
 * 3. Deploy (`npx convex deploy`). Convex then fetches Clerk's JWKS from the issuer and checks
 *    each token's signature, issuer, audience and expiry; `ctx.auth.getUserIdentity().subject`
 *    is the Clerk user id (`user_...`), the same id the gateway stores as `userId`.
 *
 * The gateway does not use this: it calls internal functions with its deploy key.
 */
import type { AuthConfig } from "convex/server";

export default {
  providers: [
    {
      domain: process.env.CLERK_JWT_ISSUER_DOMAIN!,
      applicationID: "convex",
    },
  ],
} satisfies AuthConfig;
