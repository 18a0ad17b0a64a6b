// The local Convex server's HTTP contract: `npm run test:server` (node's test runner).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { after, before, beforeEach, describe, test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const KEY = "smoke-key";
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

async function call(kind, path, args, key = KEY) {
  const response = await fetch(`${baseUrl}/api/${kind}`, {
    method: "POST",
    headers: { Authorization: `Convex ${key}`, "Content-Type": "application/json" },
    body: JSON.stringify({ path, args, format: "json" }),
  });
  return { status: response.status, body: await response.json() };
}

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

  test("a success carries the value", async () => {
    const { status, body } = await call("mutation", "gateway:getOrCreateUser", {
      userId: "user_a",
      ...newUser,
    });
    assert.equal(status, 200);
    assert.equal(body.status, "success");
    assert.deepEqual(body.logLines, []);
    assert.equal(body.value.credits, 3);
  });

  test("a ConvexError is a 560 with errorData", async () => {
    const { status, body } = await call("query", "gateway:getJob", { userId: "u", jobId: "nope" });
    assert.equal(status, 560);
    assert.equal(body.status, "error");
    assert.deepEqual(body.errorData, { code: "NOT_FOUND", message: "Job not found" });
    assert.match(body.errorMessage, /NOT_FOUND/);
  });

  test("any other error is a 560 without errorData", async () => {
    const { status, body } = await call("query", "gateway:findJob", { jobId: 1 });
    assert.equal(status, 560);
    assert.equal(body.status, "error");
    assert.equal("errorData" in body, false);
  });

  test("a wrong or missing key is a 401", async () => {
    const { status, body } = await call("query", "gateway:findJob", { jobId: "x" }, "wrong");
    assert.equal(status, 401);
    assert.equal(typeof body.code, "string");
  });

  test("an unknown function is a 404 FunctionNotFound", async () => {
    for (const path of ["gateway:nope", "nomodule:fn", "_generated/api:api", "model:toJob"]) {
      const { status, body } = await call("query", path, {});
      assert.equal(status, 404, path);
      assert.equal(body.code, "FunctionNotFound");
    }
  });

  test("malformed JSON is a 400 BadJsonBody", async () => {
    const response = await fetch(`${baseUrl}/api/query`, {
      method: "POST",
      headers: { Authorization: `Convex ${KEY}` },
      body: '{"path":',
    });
    assert.equal(response.status, 400);
    assert.equal((await response.json()).code, "BadJsonBody");
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
    const statuses = results.map((result) => result.status).sort();
    assert.deepEqual(statuses, [...Array(3).fill(200), ...Array(9).fill(560)]);
    for (const result of results.filter((r) => r.status === 560)) {
      assert.equal(result.body.errorData.code, "INSUFFICIENT_CREDITS");
    }
    const totals = await call("query", "gateway:ledgerTotals", { cursor: null });
    assert.deepEqual(totals.body.value, {
      totals: [{ userId: "user_a", credits: 0, grants: 3, charges: 3, refunds: 0 }],
      cursor: null,
    });
  });
});
