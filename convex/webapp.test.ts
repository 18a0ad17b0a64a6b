/// <reference types="vite/client" />
import { convexTest } from "convex-test";
import { ConvexError } from "convex/values";
import { beforeEach, describe, expect, test } from "vitest";
import { api, internal } from "./_generated/api";
import type { Doc } from "./_generated/dataModel";
import * as gateway from "./gateway";
import fixture from "../tests/fixtures/public_jobs.json";
import type { JobRecord } from "./model";
import schema from "./schema";
import * as webapp from "./webapp";

const modules = import.meta.glob("./**/*.*s");

const NEW_USER = { signupCredits: 10, plan: "free" };
const ALICE = "user_alice";
const BOB = "user_bob";

let t: ReturnType<typeof convexTest<typeof schema.tables>>;

beforeEach(() => {
  // The real backend's per-function limits, on (convex-test 0.0.60 `dist/transactionMetrics.js`
  // DEFAULT_TRANSACTION_LIMITS: 32,000 documents and 16 MiB read, 4,096 index ranges). Only the
  // options-object form takes them: `convexTest(schema, modules, {...})` has no third parameter
  // (`dist/index.js` `convexTest(schemaOrOptions, modules)`), so it would silently run without.
  t = convexTest({ schema, modules, transactionLimits: true });
});

const ISO_MS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;
// One job, two readers: `tests/test_models.py` checks the gateway's shape against the same cases.
const publicCases = fixture.cases as { name: string; stored: JobRecord; public: object }[];

const asAlice = () => t.withIdentity({ subject: ALICE });
const asBob = () => t.withIdentity({ subject: BOB });
const firstPage = { paginationOpts: { numItems: 10, cursor: null } };

async function charge(jobId: string, userId = ALICE) {
  return await t.mutation(internal.gateway.chargeAndCreateJob, {
    job: {
      jobId,
      userId,
      prompt: `render ${jobId}`,
      imageUrl: null,
      durationSec: 5,
      seed: 7,
      cost: 2,
      objectKey: `videos/${userId}/${jobId}.mp4`,
    },
    maxActive: 10,
    ...NEW_USER,
  });
}

describe("a deleted job", () => {
  test("is gone from the caller's list and reads as null", async () => {
    await charge("a1");
    await charge("a2");
    await t.mutation(internal.gateway.applyStatus, { jobId: "a1", status: "done" });
    await t.mutation(internal.gateway.deleteJob, { userId: ALICE, jobId: "a1" });
    const page = await asAlice().query(api.webapp.myJobs, firstPage);
    expect(page.page.map((job) => job.jobId)).toEqual(["a2"]);
    expect(await asAlice().query(api.webapp.myJob, { jobId: "a1" })).toBeNull();
    expect(await asAlice().query(api.webapp.myJob, { jobId: "a2" })).not.toBeNull();
  });
});

describe("myCredits", () => {
  test("shows the caller's credits and plan", async () => {
    await charge("job_1");
    expect(await asAlice().query(api.webapp.myCredits, {})).toEqual({ credits: 8, plan: "free" });
  });

  test("is null for a caller the store has not seen", async () => {
    await charge("job_1");
    expect(await asBob().query(api.webapp.myCredits, {})).toBeNull();
  });

  test("is null when signed out", async () => {
    await charge("job_1");
    expect(await t.query(api.webapp.myCredits, {})).toBeNull();
  });
});

describe("myJobs", () => {
  test("lists only the caller's jobs, newest first", async () => {
    await charge("a1");
    await charge("b1", BOB);
    await charge("a2");
    const page = await asAlice().query(api.webapp.myJobs, firstPage);
    expect(page.page.map((job) => job.jobId)).toEqual(["a2", "a1"]);
    expect(page.isDone).toBe(true);
    const bobs = await asBob().query(api.webapp.myJobs, firstPage);
    expect(bobs.page.map((job) => job.jobId)).toEqual(["b1"]);
  });

  test("pages with the continue cursor", async () => {
    for (const jobId of ["a1", "a2", "a3"]) {
      await charge(jobId);
    }
    const first = await asAlice().query(api.webapp.myJobs, {
      paginationOpts: { numItems: 2, cursor: null },
    });
    expect(first.page.map((job) => job.jobId)).toEqual(["a3", "a2"]);
    expect(first.isDone).toBe(false);
    const second = await asAlice().query(api.webapp.myJobs, {
      paginationOpts: { numItems: 2, cursor: first.continueCursor },
    });
    expect(second.page.map((job) => job.jobId)).toEqual(["a1"]);
    expect(second.isDone).toBe(true);
  });

  test("shows jobs as the public API does, without internal fields", async () => {
    await charge("a1");
    const [job] = (await asAlice().query(api.webapp.myJobs, firstPage)).page;
    expect(job).toEqual({
      jobId: "a1",
      status: "queued", // submitting is internal
      progress: null,
      stage: null,
      r2Url: null,
      expiresAt: null,
      posterUrl: null,
      posterExpiresAt: null,
      durationSec: 5,
      prompt: "render a1",
      imageUrl: null,
      seed: 7,
      cost: 2,
      createdAt: expect.stringMatching(ISO_MS),
      updatedAt: expect.stringMatching(ISO_MS),
      error: null,
    });
    // The gateway's fields, no more and no fewer. (Not their order: a Convex object is a sorted
    // map, convex-backend `crates/value/src/object.rs`.)
    expect(Object.keys(job).sort()).toEqual(Object.keys(publicCases[0].public).sort());
  });

  test("is an empty, finished page when signed out", async () => {
    await charge("a1");
    expect(await t.query(api.webapp.myJobs, firstPage)).toEqual({
      page: [],
      isDone: true,
      continueCursor: "",
    });
  });

  test("refuses a malformed cursor in a way usePaginatedQuery recognizes", async () => {
    await charge("a1");
    const error = await asAlice()
      .query(api.webapp.myJobs, { paginationOpts: { numItems: 2, cursor: "garbage" } })
      .then(
        () => null,
        (e: unknown) => e,
      );
    expect(error).toBeInstanceOf(ConvexError);
    expect((error as ConvexError<{ code: string }>).data.code).toBe("INVALID_CURSOR");
    expect((error as Error).message).toContain("InvalidCursor");
  });
});

describe("myJob", () => {
  test("returns the caller's job", async () => {
    await charge("a1");
    const job = await asAlice().query(api.webapp.myJob, { jobId: "a1" });
    expect(job?.jobId).toBe("a1");
  });

  test("shows the download link and error only when they apply", async () => {
    await charge("a1");
    await t.mutation(internal.gateway.saveDownloadUrl, {
      jobId: "a1",
      url: "https://r2.example.com/a1.mp4?sig=x",
      expiresAt: 2_000,
    });
    expect(await asAlice().query(api.webapp.myJob, { jobId: "a1" })).toMatchObject({
      status: "queued",
      r2Url: null,
      expiresAt: null,
    });
    await t.mutation(internal.gateway.applyStatus, { jobId: "a1", status: "done" });
    expect(await asAlice().query(api.webapp.myJob, { jobId: "a1" })).toMatchObject({
      status: "done",
      r2Url: "https://r2.example.com/a1.mp4?sig=x",
      expiresAt: "1970-01-01T00:00:02.000Z",
      error: null,
    });
    await charge("a2");
    await t.mutation(internal.gateway.cancelJob, { userId: ALICE, jobId: "a2" });
    expect(await asAlice().query(api.webapp.myJob, { jobId: "a2" })).toMatchObject({
      status: "canceled",
      error: { code: "CANCELED", detail: "Canceled by the user" },
    });
  });

  test("is null for another user's job", async () => {
    await charge("a1");
    expect(await asBob().query(api.webapp.myJob, { jobId: "a1" })).toBeNull();
  });

  test("is null for an unknown job", async () => {
    expect(await asAlice().query(api.webapp.myJob, { jobId: "nope" })).toBeNull();
  });

  test("is null when signed out", async () => {
    await charge("a1");
    expect(await t.query(api.webapp.myJob, { jobId: "a1" })).toBeNull();
  });
});

describe("the job shape the gateway shows", () => {
  /** Store a record as `gateway.ts` does: null optional fields are left out. */
  async function store(record: JobRecord) {
    const doc = Object.fromEntries(Object.entries(record).filter(([, value]) => value !== null));
    await t.run(async (ctx) => {
      await ctx.db.insert("jobs", doc as Omit<Doc<"jobs">, "_id" | "_creationTime">);
    });
  }

  test.each(publicCases)("myJob: $name", async ({ stored, public: shown }) => {
    await store(stored);
    const job = await t.withIdentity({ subject: stored.userId }).query(api.webapp.myJob, {
      jobId: stored.jobId,
    });
    expect(job).toEqual(shown);
    expect(Object.keys(job!).sort()).toEqual(Object.keys(shown).sort()); // not one field more
  });

  test("myJobs: every case in one page, newest first", async () => {
    for (const { stored } of publicCases) {
      await store(stored);
    }
    const byNewest = [...publicCases].sort(
      (a, b) =>
        b.stored.createdAt - a.stored.createdAt || publicCases.indexOf(b) - publicCases.indexOf(a),
    );
    const { page } = await asAlice().query(api.webapp.myJobs, firstPage);
    expect(page).toEqual(byNewest.map((c) => c.public));
  });
});

describe("access", () => {
  // Only deploy-key holders may call internal functions; browsers reach only `webapp`.
  test.each(Object.entries(gateway))("gateway.%s is internal", (_name, fn) => {
    expect((fn as { isInternal?: boolean }).isInternal).toBe(true);
  });

  test.each(Object.entries(webapp))("webapp.%s is a public query", (_name, fn) => {
    const registered = fn as { isPublic?: boolean; isQuery?: boolean };
    expect([registered.isPublic, registered.isQuery]).toEqual([true, true]);
  });
});
