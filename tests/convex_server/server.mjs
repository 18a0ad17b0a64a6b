// A stand-in for a Convex deployment, for the gateway's tests: it runs the real functions in
// `convex/` with convex-test (in memory) and answers Convex's HTTP API.
//
//   node --import tsx tests/convex_server/server.mjs [port]      (or: npm run convex-server)
//
// Listens on 127.0.0.1:<port> (argv[2], else $PORT, else 0 = any free port) and prints one line,
// `LISTENING <port>`, once it accepts requests. Calls need `Authorization: Convex <key>` with
// $CONVEX_TEST_DEPLOY_KEY (default "test-deploy-key"); like a deploy key, it may call internal
// functions. The /_test routes need no key. Routes:
//   POST /api/query, /api/mutation  {"path": "module:function", "args": {...}, "format": "json"}
//   POST /_test/reset               forget all data (a fresh convex-test instance)
//   GET  /_test/health              200 once ready
// What differs from a real deployment: no actions, no user identities, ids and error texts are
// convex-test's, limits are not enforced, and `errorMessage` is only roughly Convex's.
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
const MAX_BODY_BYTES = 16 * 1024 * 1024; // Convex's own argument limit is 16 MiB

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
let backend = convexTest(schema, modules);

// One call at a time, in arrival order: Convex runs mutations as serializable transactions, and
// convex-test has one in-memory database. Queries join the queue too, so none sees a half-done call.
let queue = Promise.resolve();
function serialized(task) {
  const result = queue.then(task);
  queue = result.catch(() => {});
  return result;
}

/** The registered function at a Convex path like "gateway:getJob", or null. */
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
  return { fn, reference: makeFunctionReference(`${match[1]}:${name}`) };
}

function send(response, status, body) {
  const text = JSON.stringify(body);
  response.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(text),
  });
  response.end(text);
}

async function readBody(request) {
  const chunks = [];
  let size = 0;
  for await (const chunk of request) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      throw Object.assign(new Error("Request body is too large"), { status: 413 });
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

async function parseCall(request) {
  let body;
  try {
    body = JSON.parse(await readBody(request));
  } catch (error) {
    if (error.status === 413) {
      return { error: [413, { code: "PayloadTooLarge", message: error.message }] };
    }
    return {
      error: [400, { code: "BadJsonBody", message: `Invalid JSON body: ${error.message}` }],
    };
  }
  const isObject = (value) => typeof value === "object" && value !== null && !Array.isArray(value);
  if (!isObject(body) || typeof body.path !== "string") {
    return { error: [400, { code: "BadJsonBody", message: 'The body needs a string "path"' }] };
  }
  if (body.format !== undefined && body.format !== "json") {
    return { error: [400, { code: "BadFormat", message: `Unsupported format ${body.format}` }] };
  }
  const rawArgs = body.args ?? {};
  if (!isObject(rawArgs)) {
    return { error: [400, { code: "BadJsonBody", message: '"args" must be an object' }] };
  }
  try {
    return { path: body.path, args: jsonToConvex(rawArgs) };
  } catch (error) {
    return {
      error: [400, { code: "BadJsonBody", message: `Invalid Convex value: ${error.message}` }],
    };
  }
}

/** A function's outcome in the HTTP API's shape: [status, body]. */
async function run(kind, path, args) {
  const found = await findFunction(path);
  if (!found) {
    return [
      404,
      { code: "FunctionNotFound", message: `Could not find public function for '${path}'` },
    ];
  }
  const isKind = kind === "query" ? found.fn.isQuery : found.fn.isMutation;
  if (!isKind) {
    return [400, { code: "BadRequest", message: `${path} is not a ${kind}` }];
  }
  try {
    const value = await serialized(() => backend[kind](found.reference, args));
    return [200, { status: "success", value: convexToJson(value ?? null), logLines: [] }];
  } catch (error) {
    if (error instanceof ConvexError || error?.name === "ConvexError") {
      const message = `Uncaught ConvexError: ${error.message}`;
      const errorData = convexToJson(error.data ?? null);
      return [560, { status: "error", errorMessage: message, errorData, logLines: [] }];
    }
    console.error(`${path} failed:`, error);
    const message = `Uncaught ${error?.name ?? "Error"}: ${error?.message ?? String(error)}`;
    return [560, { status: "error", errorMessage: message, logLines: [] }];
  }
}

async function handle(request, response) {
  const url = new URL(request.url, "http://localhost");
  // The /_test routes are for fixtures and need no key.
  if (url.pathname === "/_test/health" && request.method === "GET") {
    return send(response, 200, { status: "ok" });
  }
  if (url.pathname === "/_test/reset" && request.method === "POST") {
    await serialized(() => {
      backend = convexTest(schema, modules);
    });
    return send(response, 200, { status: "success" });
  }
  if (request.headers.authorization !== `Convex ${DEPLOY_KEY}`) {
    return send(response, 401, {
      code: "Unauthenticated",
      message: "Missing or invalid deploy key",
    });
  }
  const kind = { "/api/query": "query", "/api/mutation": "mutation" }[url.pathname];
  if (!kind) {
    return send(response, 404, { code: "NotFound", message: `No route ${url.pathname}` });
  }
  if (request.method !== "POST") {
    return send(response, 405, { code: "MethodNotAllowed", message: "Use POST" });
  }
  const call = await parseCall(request);
  if (call.error) {
    return send(response, ...call.error);
  }
  return send(response, ...(await run(kind, call.path, call.args)));
}

const server = createServer((request, response) => {
  handle(request, response).catch((error) => {
    console.error("convex test server:", error);
    if (!response.headersSent) {
      send(response, 500, { code: "InternalServerError", message: String(error) });
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
