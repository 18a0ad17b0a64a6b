// A stand-in for a Convex deployment, for the gateway's tests: it runs the real functions in
// `convex/` with convex-test (in memory, with Convex's transaction limits on) and answers
// Convex's HTTP API in the shapes the real backend gives. Each shape names its source in
// get-convex/convex-backend (read at commit 94a42c3d): the router is
// crates/local_backend/src/public_api.rs; the HTTP API docs are
// npm-packages/docs/docs/http-api/index.mdx. `tests/convex_fixtures.py` holds the same shapes
// for the client's unit tests.
//
//   node --import tsx tests/convex_server/server.mjs [port]      (or: npm run convex-server)
//
// Listens on 127.0.0.1:<port> (argv[2], else $PORT, else 0 = any free port) and prints one line,
// `LISTENING <port>`, once it accepts requests. `Authorization: Convex <key>` with
// $CONVEX_TEST_DEPLOY_KEY (default "test-deploy-key") is the deploy key: it may call internal
// functions. Without the header a caller may call public functions only. Routes:
//   POST /api/query, /api/mutation, /api/action   {"path": "module:function", "args": {...},
//                                                  "format": "json" | "convex_encoded_json"}
//   POST /_test/reset      forget all data and every switch below (a fresh convex-test instance)
//   POST /_test/occ        {"path": "gateway:fn", "times": n?}: the next n calls of that mutation
//                          (all of them without n; none with n = 0) answer the OCC 503 unrun
//   POST /_test/redact     {"redact": bool}: true (the default) answers as a production
//                          deployment, whose errors read only "Server Error"; false as a dev one
//   GET  /_test/health     200 once ready
// The /_test routes need no key. What differs from a real deployment: no actions, no user
// identities (a Bearer token is refused), ids and the text of a function's own errors are
// convex-test's, argument-validation texts are convex-test's behind the backend's prefix, and
// stack frames are left out.
import { randomBytes } from "node:crypto";
import { readdirSync } from "node:fs";
import { createServer } from "node:http";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import { convexTest } from "convex-test";
import { makeFunctionReference } from "convex/server";
import { ConvexError, convexToJson, jsonToConvex } from "convex/values";

const HERE = dirname(fileURLToPath(import.meta.url));
const CONVEX_DIR = resolve(HERE, "../../convex");
const DEPLOY_KEY = process.env.CONVEX_TEST_DEPLOY_KEY || "test-deploy-key";
// MAX_BACKEND_PUBLIC_API_REQUEST_SIZE: 16 MiB + 2000 (crates/common/src/knobs.rs).
const MAX_BODY_BYTES = (1 << 24) + 2000;
const OCC_CODE = "OptimisticConcurrencyControlFailure"; // OCC_ERROR, crates/errors/src/lib.rs

/** The modules map convex-test wants: every function module, keyed like `import.meta.glob`. */
function convexModules() {
  const modules = {};
  const walk = (dir) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) {
        walk(path);
      } else if (/\.(ts|js|mjs)$/.test(entry.name) && !/\.(d|test)\.ts$/.test(entry.name)) {
        // One key must contain `_generated`: convex-test takes the module root from it.
        const key = "../../convex/" + relative(CONVEX_DIR, path).split("\\").join("/");
        modules[key] = () => import(pathToFileURL(path).href);
      }
    }
  };
  walk(CONVEX_DIR);
  return modules;
}

const modules = convexModules();
// Load every module now, so a broken one fails the start rather than the first call.
await Promise.all(Object.values(modules).map((load) => load()));
const schema = (await modules["../../convex/schema.ts"]()).default;
// The real backend enforces its limits on every function (docs: production/state/limits.mdx);
// convex-test does only when asked.
const freshBackend = () => convexTest({ schema, modules, transactionLimits: true });
const freshSwitches = () => ({ redact: true, occ: new Map() });
let backend = freshBackend();
let switches = freshSwitches();

// One call at a time, in arrival order: Convex runs mutations as serializable transactions, and
// convex-test has one in-memory database. Queries join the queue too, so none sees a half-done call.
let queue = Promise.resolve();
function serialized(task) {
  const result = queue.then(task);
  queue = result.catch(() => {});
  return result;
}

// --- answers --------------------------------------------------------------------------------

function send(response, status, body) {
  const text = JSON.stringify(body);
  response.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(text),
  });
  response.end(text);
}

/** A failure outside the function's run: `HttpError::into_response` (common/src/http/mod.rs). */
class HttpError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * `errorMessage`: `RedactedJsError`'s Display (crates/application/src/redaction.rs) is
 * "[Request ID: <id>] Server Error", then, unless redacted, a newline and the JsError, whose
 * Debug form ends in a newline (crates/common/src/errors.rs). RequestId::new() is 8 random bytes
 * in hex (crates/common/src/execution_context.rs).
 */
function errorMessage(cause) {
  const head = `[Request ID: ${randomBytes(8).toString("hex")}] Server Error`;
  return switches.redact ? head : `${head}\n${cause}\n`;
}

/**
 * A function's failure: `UdfResponse::Error` (public_api.rs), HTTP 200. `errorData` only for a
 * ConvexError (`custom_data_if_any`, redaction.rs), exported in the requested format, and kept
 * even when the message is redacted. `logLines` is skipped when empty, and a production
 * deployment sends none (`RedactedLogLines::from_log_lines`), so it never appears here.
 */
function functionError(cause, format, data) {
  const body = { status: "error", errorMessage: errorMessage(cause) };
  if (data !== undefined) {
    body.errorData = exportValue(data, format);
  }
  return [200, body];
}

/** `UdfResponse::Success` (public_api.rs), HTTP 200; `logLines` skipped when empty. */
function success(value, format) {
  return [200, { status: "success", value: exportValue(value ?? null, format) }];
}

/**
 * `export_value` (public_api.rs): `convex_encoded_json` is the value as Convex encodes it
 * (`$integer`, `$bytes`, `$float`); `json` is ConvexCleanJSON (crates/value/src/export.rs,
 * `export_clean`): an int64 becomes a string, bytes base64, NaN and infinities strings.
 */
function exportValue(value, format) {
  return format === "convex_encoded_json" ? convexToJson(value) : cleanJson(value);
}

function cleanJson(value) {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof ArrayBuffer) return Buffer.from(value).toString("base64");
  if (typeof value === "number" && !Number.isFinite(value)) {
    return Number.isNaN(value) ? "NaN" : value > 0 ? "Infinity" : "-Infinity";
  }
  if (Array.isArray(value)) return value.map(cleanJson);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, cleanJson(v)]));
  }
  return value;
}

/**
 * `ValueFormat::from_str` (crates/value/src/export.rs). With no `format`, an HTTP caller without
 * a Convex-Client header gets clean JSON (`ClientVersion::default_format`, common/src/version.rs).
 */
function parseFormat(format) {
  const known = {
    convex_encoded_json: "convex_encoded_json",
    convex_json: "convex_encoded_json",
    json: "json",
    convex_clean_json: "json",
    export_json: "json", // ConvexExportJSON differs only for types our functions never return
  };
  if (format === undefined || format === null) return "json";
  if (typeof format === "string" && Object.hasOwn(known, format)) return known[format];
  throw new HttpError(400, "BadFormat", `format param must be one of [\`json\`]. Got ${format}`);
}

// --- the request ----------------------------------------------------------------------------

/** The body, as the backend's `Json` extractor reads it (crates/common/src/http/extract.rs). */
async function readCall(request) {
  if (!/^application\/(.+\+)?json/i.test(request.headers["content-type"] ?? "")) {
    const message = "Expected request with `Content-Type: application/json`";
    throw new HttpError(400, "BadJsonBody", message);
  }
  const chunks = [];
  let size = 0;
  for await (const chunk of request) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      // axum's DefaultBodyLimit, mapped to BadJsonBody by `buffer_body` (extract.rs).
      const message = "Failed to buffer the request body: length limit exceeded";
      throw new HttpError(400, "BadJsonBody", message);
    }
    chunks.push(chunk);
  }
  let body;
  try {
    body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  } catch (error) {
    const message = `Failed to parse the request body as JSON: ${error.message}`;
    throw new HttpError(400, "BadJsonBody", message);
  }
  // `UdfPostRequest` (public_api.rs): `path` and `args` required, `format` optional.
  const missing = ["path", "args"].find((field) => body === null || !(field in Object(body)));
  if (typeof body !== "object" || Array.isArray(body) || missing) {
    const message = `Failed to deserialize the JSON body into the target type: missing field \`${missing ?? "path"}\``;
    throw new HttpError(400, "BadJsonBody", message);
  }
  if (typeof body.path !== "string") {
    const message = "Failed to deserialize the JSON body into the target type: path: invalid type";
    throw new HttpError(400, "BadJsonBody", message);
  }
  return body;
}

/**
 * Who calls (crates/local_backend/src/authentication.rs, ExtractAuthenticationToken): a
 * `Convex <key>` header is an admin key, checked by `ApplicationAuth::check_key`
 * (crates/authentication/src/application_auth.rs) -> 401 BadAdminKey when wrong. No header is an
 * unknown identity, which may call public functions only.
 */
function identify(request) {
  const header = request.headers.authorization;
  if (header === undefined) {
    return { admin: false };
  }
  if (header.slice(0, 7).toLowerCase() === "convex ") {
    if (header.slice(7) !== DEPLOY_KEY) {
      const message = "The provided admin key was invalid for this instance";
      throw new HttpError(401, "BadAdminKey", message);
    }
    return { admin: true };
  }
  // A Bearer token would be checked against auth.config.ts; this imitation has no identities.
  // crates/authentication/src/lib.rs: unauthenticated("InvalidAuthHeader", ...).
  const message = "Could not parse as OIDC ID token. Token might not be an OIDC-compliant JWT.";
  throw new HttpError(401, "InvalidAuthHeader", message);
}

/** The function at a Convex path like "gateway:getJob" (or "gateway.js:getJob"), or null. */
async function findFunction(path) {
  const match = /^([A-Za-z0-9_/.-]+?)(?:\.js)?(?::([A-Za-z0-9_]+))?$/.exec(path);
  if (!match || match[1].split("/").some((part) => part.startsWith("_") || part === "..")) {
    return null;
  }
  const load = modules[`../../convex/${match[1]}.ts`] ?? modules[`../../convex/${match[1]}.js`];
  if (!load) {
    return null;
  }
  const name = match[2] ?? "default";
  const module = await load();
  const fn = Object.hasOwn(module, name) ? module[name] : undefined;
  if (!fn || !(fn.isQuery || fn.isMutation || fn.isAction)) {
    return null;
  }
  const kind = fn.isQuery ? "query" : fn.isMutation ? "mutation" : "action";
  // The stripped path names the function in errors; the canonical one adds ".js"
  // (crates/convex/sync_types/src/udf_path.rs, `strip` and Display).
  return {
    fn,
    kind,
    stripped: name === "default" ? match[1] : `${match[1]}:${name}`,
    canonical: `${match[1]}.js:${name}`,
    reference: makeFunctionReference(`${match[1]}:${name}`),
  };
}

const KIND_NAME = { query: "Query", mutation: "Mutation", action: "Action" }; // UdfType Display

/**
 * Why the deployment will not run this call, as `ValidatedPathAndArgs::new_with_returns_validator`
 * says it (crates/udf/src/validation.rs); null when it will. Each is a JsError, so the router
 * answers it 200 status:error like a throw (UDF_404_ON_BAD_PATH, which would make the first two
 * a 404, is off by default: crates/common/src/knobs.rs).
 */
function refusal(found, path, kind, identity, args) {
  // An internal function looks missing to a caller without the key: `missing_or_internal_error`.
  const visible = found && (identity.admin || found.fn.isPublic);
  if (!visible) {
    const shown = found?.stripped ?? path.replace(/\.js(?=:|$)/, "");
    return `Could not find public function for '${shown}'.`;
  }
  if (found.kind !== kind) {
    const { canonical } = found;
    return `Trying to execute ${canonical} as ${KIND_NAME[kind]}, but it is defined as ${KIND_NAME[found.kind]}.`;
  }
  // crates/model/src/modules/function_validators.rs, `check_args`.
  if (args === null || typeof args !== "object" || Array.isArray(args)) {
    const shown = JSON.stringify(args);
    return `Expected to receive an object as the function's argument. Instead received: ${shown}`;
  }
  return null;
}

/** A thrown error, as the backend words it (its text is convex-test's; see the header). */
function describe(error) {
  if (String(error?.stack ?? "").includes("validateFunctionArgs")) {
    // Argument validation runs before the handler: `ArgumentValidationError: {error}`
    // (crates/udf/src/validation.rs, `new_inner`).
    return `ArgumentValidationError: ${String(error.message).replace(/^Validator error: /, "")}`;
  }
  // crates/isolate/src/helpers.rs, `format_uncaught_error`: "Uncaught <name>: <message>". A
  // ConvexError's message is its data, stringified (npm-packages/convex/src/values/errors.ts).
  return `Uncaught ${error?.name ?? "Error"}: ${error?.message ?? String(error)}`;
}

/**
 * The OCC 503 (crates/errors/src/lib.rs, `user_occ` without table info): what a mutation answers
 * once the backend's own retries are spent (`_retry_mutation` in
 * crates/application/src/application_function_runner/mod.rs returns the error; it is not a user
 * error, so `mutation_udf` bails and the router answers it as an HttpResponseError). Nothing ran.
 */
function occ(path) {
  const remaining = switches.occ.get(path);
  if (remaining === undefined) return false;
  if (remaining !== Infinity) {
    remaining <= 1 ? switches.occ.delete(path) : switches.occ.set(path, remaining - 1);
  }
  const message =
    "Documents read from or written to some table changed while this mutation was being run " +
    "and on every subsequent retry. See https://docs.convex.dev/error#1";
  throw new HttpError(503, OCC_CODE, message);
}

/** One `POST /api/<kind>`, in the order `public_*_post` does it (public_api.rs). */
async function call(request, kind) {
  const body = await readCall(request); // extractors run first: a bad body beats a bad key
  const identity = identify(request); // then `st.api.authenticate`
  const found = await findFunction(body.path);
  let args;
  try {
    args = jsonToConvex(body.args); // `UdfArgsJson`: always convex-encoded, whatever `format`
  } catch (error) {
    throw new HttpError(400, "BadConvexValue", String(error.message)); // not taken from the source
  }
  const why = refusal(found, body.path, kind, identity, args);
  if (why !== null) {
    return functionError(why, parseFormat(body.format));
  }
  if (kind === "mutation") {
    occ(found.stripped);
  }
  if (kind === "action") {
    throw new HttpError(500, "InternalServerError", "This imitation runs no actions");
  }
  let outcome;
  try {
    const value = await serialized(() => backend[kind](found.reference, args));
    outcome = { value };
  } catch (error) {
    outcome = { error };
  }
  // The format is parsed only after the function ran (public_api.rs): a mutation with a bad
  // format has committed by the time it answers 400.
  const format = parseFormat(body.format);
  if (!("error" in outcome)) {
    return success(outcome.value, format);
  }
  const { error } = outcome;
  const isConvexError = error instanceof ConvexError || error?.name === "ConvexError";
  if (!isConvexError && !switches.redact) {
    console.error(`${body.path} failed:`, error);
  }
  return functionError(describe(error), format, isConvexError ? (error.data ?? null) : undefined);
}

// --- routes ---------------------------------------------------------------------------------

async function readJson(request) {
  const chunks = [];
  for await (const chunk of request) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString("utf8");
  return text ? JSON.parse(text) : {};
}

async function testRoute(request, response, pathname) {
  if (pathname === "/_test/health" && request.method === "GET") {
    return send(response, 200, { status: "ok" });
  }
  if (pathname === "/_test/reset" && request.method === "POST") {
    await serialized(() => {
      backend = freshBackend();
      switches = freshSwitches();
    });
    return send(response, 200, { status: "success" });
  }
  if (pathname === "/_test/occ" && request.method === "POST") {
    const { path, times } = await readJson(request);
    const count = times === undefined || times === null ? Infinity : Number(times);
    count > 0 ? switches.occ.set(path, count) : switches.occ.delete(path);
    return send(response, 200, { status: "success" });
  }
  if (pathname === "/_test/redact" && request.method === "POST") {
    switches.redact = Boolean((await readJson(request)).redact);
    return send(response, 200, { status: "success" });
  }
  return send(response, 404, { code: "NotFound", message: `No route ${pathname}` });
}

const KINDS = { "/api/query": "query", "/api/mutation": "mutation", "/api/action": "action" };

async function handle(request, response) {
  const { pathname } = new URL(request.url, "http://localhost");
  if (pathname.startsWith("/_test/")) {
    return testRoute(request, response, pathname);
  }
  const kind = KINDS[pathname];
  if (!kind || request.method !== "POST") {
    // Not taken from the source: the gateway only ever POSTs to the three routes above.
    return send(response, 404, {
      code: "NotFound",
      message: `No route ${request.method} ${pathname}`,
    });
  }
  try {
    return send(response, ...(await call(request, kind)));
  } catch (error) {
    if (error instanceof HttpError) {
      return send(response, error.status, { code: error.code, message: error.message });
    }
    throw error;
  }
}

const server = createServer((request, response) => {
  handle(request, response).catch((error) => {
    console.error("convex test server:", error);
    if (!response.headersSent) {
      // INTERNAL_SERVER_ERROR / INTERNAL_SERVER_ERROR_MSG, crates/errors/src/lib.rs.
      const message = "Your request couldn't be completed. Try again later.";
      send(response, 500, { code: "InternalServerError", message });
    }
  });
});

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
server.listen(port, "127.0.0.1", () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
