// The local Convex server's HTTP contract: `npm run test:server` (node's test runner). Each
// expectation is the real backend's answer shape, with its source in server.mjs.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { after, before, beforeEach, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const KEY = "smoke-key";
const REDACTED = /^\[Request ID: [0-9a-f]{16}\] Server Error$/;
let server;
let baseUrl;

before(async () => {
  server = spawn(process.execPath, ["--import", "tsx", "tests/convex_server/server.mjs", "0"], {
    cwd: ROOT,
    env: { ...process.env, CONVEX_TEST_DEPLOY_KEY: KEY },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const [line] = await once(server.stdout, "data");
  const match = /^LISTENING (\d+)$/m.exec(line.toString());
  assert.ok(match, `unexpected first line: ${line}`);
  baseUrl = `http://127.0.0.1:${match[1]}`;
});

after(() => server?.kill());

beforeEach(async () => {
  assert.equal((await fetch(`${baseUrl}/_test/reset`, { method: "POST" })).status, 200);
});

async function post(url, body, headers = {}) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

function call(kind, path, args, { key = KEY, format = "convex_encoded_json" } = {}) {
  const headers = key === null ? {} : { Authorization: `Convex ${key}` };
  return post(`${baseUrl}/api/${kind}`, { path, args, format }, headers);
}

const admin = (route, body) => post(`${baseUrl}/_test/${route}`, body);

const newUser = { signupCredits: 3, plan: "free" };
const job = (jobId) => ({
  jobId,
  userId: "user_a",
  prompt: "p",
  imageUrl: null,
  durationSec: 5,
  seed: 1,
  cost: 1,
  objectKey: `videos/user_a/${jobId}.mp4`,
});

describe("convex test server", () => {
  test("health needs no key", async () => {
    assert.equal((await fetch(`${baseUrl}/_test/health`)).status, 200);
  });

  test("a success carries the value and no empty logLines", async () => {
    const { status, body } = await call("mutation", "gateway:getOrCreateUser", {
      userId: "user_a",
      ...newUser,
    });
    assert.equal(status, 200);
    assert.equal(body.status, "success");
    assert.equal("logLines" in body, false);
    assert.equal(body.value.credits, 3);
  });

  test("a ConvexError is a 200 with errorData and a redacted message", async () => {
    const { status, body } = await call("query", "gateway:getJob", { userId: "u", jobId: "nope" });
    assert.equal(status, 200);
    assert.deepEqual(Object.keys(body).sort(), ["errorData", "errorMessage", "status"]);
    assert.equal(body.status, "error");
    assert.deepEqual(body.errorData, { code: "NOT_FOUND", message: "Job not found" });
    assert.match(body.errorMessage, REDACTED);
  });

  test("a dev deployment shows the error under the redacted line", async () => {
    await admin("redact", { redact: false });
    const { body } = await call("query", "gateway:getJob", { userId: "u", jobId: "nope" });
    const [head, cause] = body.errorMessage.split("\n");
    assert.match(head, REDACTED);
    assert.equal(cause, 'Uncaught ConvexError: {"code":"NOT_FOUND","message":"Job not found"}');
  });

  test("any other error is a 200 without errorData", async () => {
    // A v.number() where the validator wants a string: argument validation fails.
    const { status, body } = await call("query", "gateway:findJob", { jobId: 1 });
    assert.equal(status, 200);
    assert.deepEqual(Object.keys(body).sort(), ["errorMessage", "status"]);
    assert.match(body.errorMessage, REDACTED);
    await admin("redact", { redact: false });
    const dev = await call("query", "gateway:findJob", { jobId: 1 });
    assert.match(dev.body.errorMessage, /\nArgumentValidationError: /);
  });

  test("a wrong or malformed key is a 401 BadAdminKey", async () => {
    const { status, body } = await call("query", "gateway:ping", {}, { key: "wrong" });
    assert.equal(status, 401);
    assert.deepEqual(body, {
      code: "BadAdminKey",
      message: "The provided admin key was invalid for this instance",
    });
  });

  test("without a key, internal functions look missing", async () => {
    await admin("redact", { redact: false });
    const { status, body } = await call("query", "gateway:ping", {}, { key: null });
    assert.equal(status, 200);
    assert.match(body.errorMessage, /\nCould not find public function for 'gateway:ping'\.\n$/);
  });

  test("an unknown function is a 200 error naming it", async () => {
    await admin("redact", { redact: false });
    for (const path of ["gateway:nope", "nomodule:fn", "_generated/api:api", "model:toJob"]) {
      const { status, body } = await call("query", path, {});
      assert.equal(status, 200, path);
      assert.equal(body.status, "error");
      assert.ok(body.errorMessage.includes(`Could not find public function for '${path}'.`));
    }
  });

  test("a function of another kind is a 200 error", async () => {
    await admin("redact", { redact: false });
    const { status, body } = await call("mutation", "gateway:ping", {});
    assert.equal(status, 200);
    assert.ok(
      body.errorMessage.includes(
        "Trying to execute gateway.js:ping as Mutation, but it is defined as Query.",
      ),
    );
  });

  test("a malformed body is a 400 BadJsonBody, before the key is checked", async () => {
    for (const text of ['{"path":', '{"args": {}}', "[]"]) {
      const { status, body } = await post(`${baseUrl}/api/query`, text, {
        Authorization: "Convex wrong",
      });
      assert.equal(status, 400, text);
      assert.equal(body.code, "BadJsonBody");
      assert.equal(typeof body.message, "string");
    }
  });

  test("a body that is not declared JSON is a 400 BadJsonBody", async () => {
    const response = await fetch(`${baseUrl}/api/query`, {
      method: "POST",
      headers: { Authorization: `Convex ${KEY}` },
      body: JSON.stringify({ path: "gateway:ping", args: {} }),
    });
    assert.equal(response.status, 400);
    assert.equal((await response.json()).code, "BadJsonBody");
  });

  test("an unknown format is a 400 BadFormat, after a mutation committed", async () => {
    const args = { userId: "user_a", amount: 5, reason: "r", ...newUser };
    const refused = await call("mutation", "gateway:grantCredits", args, { format: "yaml" });
    assert.equal(refused.status, 400);
    assert.equal(refused.body.code, "BadFormat");
    const user = await call("query", "gateway:getUser", { userId: "user_a" });
    assert.equal(user.body.value.credits, 8);
  });

  test("json and convex_encoded_json agree on our values", async () => {
    const args = { userId: "user_a", ...newUser };
    await call("mutation", "gateway:getOrCreateUser", args);
    const encoded = await call("query", "gateway:getUser", { userId: "user_a" });
    const clean = await call("query", "gateway:getUser", { userId: "user_a" }, { format: "json" });
    assert.deepEqual(encoded.body.value, clean.body.value);
  });

  test("the OCC switch answers 503 without running the mutation", async () => {
    await admin("occ", { path: "gateway:grantCredits", times: 1 });
    const args = { userId: "user_a", amount: 5, reason: "r", ...newUser };
    const refused = await call("mutation", "gateway:grantCredits", args);
    assert.equal(refused.status, 503);
    assert.equal(refused.body.code, "OptimisticConcurrencyControlFailure");
    assert.equal((await call("query", "gateway:getUser", { userId: "user_a" })).body.value, null);
    const second = await call("mutation", "gateway:grantCredits", args);
    assert.equal(second.status, 200);
    assert.equal(second.body.value.credits, 8);
  });

  test("the OCC switch holds until reset without a count", async () => {
    await admin("occ", { path: "gateway:grantCredits" });
    const args = { userId: "user_a", amount: 5, reason: "r", ...newUser };
    for (let i = 0; i < 3; i++) {
      assert.equal((await call("mutation", "gateway:grantCredits", args)).status, 503);
    }
    await fetch(`${baseUrl}/_test/reset`, { method: "POST" });
    assert.equal((await call("mutation", "gateway:grantCredits", args)).status, 200);
  });

  test("state persists across requests until reset", async () => {
    await call("mutation", "gateway:chargeAndCreateJob", {
      job: job("j1"),
      maxActive: 5,
      ...newUser,
    });
    assert.equal((await call("query", "gateway:findJob", { jobId: "j1" })).body.value.jobId, "j1");
    await fetch(`${baseUrl}/_test/reset`, { method: "POST" });
    assert.equal((await call("query", "gateway:findJob", { jobId: "j1" })).body.value, null);
  });

  test("concurrent charges never overspend", async () => {
    const results = await Promise.all(
      Array.from({ length: 12 }, (_, i) =>
        call("mutation", "gateway:chargeAndCreateJob", {
          job: job(`j${i}`),
          maxActive: 10,
          ...newUser,
        }),
      ),
    );
    const outcomes = results.map((result) => result.body.status).sort();
    assert.deepEqual(outcomes, [...Array(9).fill("error"), ...Array(3).fill("success")]);
    for (const result of results.filter((r) => r.body.status === "error")) {
      assert.equal(result.status, 200);
      assert.equal(result.body.errorData.code, "INSUFFICIENT_CREDITS");
    }
    const totals = await call("query", "gateway:ledgerTotals", { cursor: null });
    assert.deepEqual(totals.body.value, {
      totals: [{ userId: "user_a", credits: 0, grants: 3, charges: 3, refunds: 0 }],
      cursor: null,
    });
  });
});
