/// <reference types="vite/client" />
// `jobsUpdatedSince`: the one query the gateway's event streams poll (events.py).
import { convexTest } from "convex-test";
import { beforeEach, describe, expect, test } from "vitest";
import { internal } from "./_generated/api";
import { MAX_UPDATED_JOBS } from "./model";
import schema from "./schema";

const modules = import.meta.glob("./**/*.*s");

let t: ReturnType<typeof convexTest<typeof schema.tables>>;

beforeEach(() => {
  // The real backend's read limits, on: see gateway.test.ts.
  t = convexTest({ schema, modules, transactionLimits: true });
});

/** Jobs stored as they are after a write at `updatedAt`, for users alice and bob in turn. */
async function storeJobs(changes: [jobId: string, updatedAt: number][]) {
  await t.run(async (ctx) => {
    for (const [index, [jobId, updatedAt]] of changes.entries()) {
      const userId = index % 2 === 0 ? "user_alice" : "user_bob";
      await ctx.db.insert("jobs", {
        jobId,
        userId,
        status: "queued",
        prompt: "A silver drone flies through a neon skyline",
        durationSec: 5,
        seed: 42,
        cost: 5,
        objectKey: `videos/${userId}/${jobId}.mp4`,
        createdAt: 1_000,
        updatedAt,
        checkedAt: updatedAt,
      });
    }
  });
}

async function since(since: number, afterJobId = "", limit = 100) {
  const jobs = await t.query(internal.gateway.jobsUpdatedSince, { since, afterJobId, limit });
  return jobs.map((job) => [job.jobId, job.updatedAt]);
}

describe("jobsUpdatedSince", () => {
  test("returns the later changes of every user, oldest first", async () => {
    await storeJobs([
      ["job_c", 3_000],
      ["job_a", 1_000],
      ["job_b", 2_000],
    ]);
    expect(await since(1_000)).toEqual([
      ["job_a", 1_000],
      ["job_b", 2_000],
      ["job_c", 3_000],
    ]);
    expect(await since(2_001)).toEqual([["job_c", 3_000]]);
  });

  test("continues among jobs updated in the same millisecond after the given job", async () => {
    await storeJobs([
      ["job_b", 2_000],
      ["job_a", 2_000],
      ["job_c", 2_000],
      ["job_d", 2_500],
    ]);
    expect(await since(2_000, "job_a")).toEqual([
      ["job_b", 2_000],
      ["job_c", 2_000],
      ["job_d", 2_500],
    ]);
  });

  test("pages through a burst without losing or repeating a change", async () => {
    // 30 changes, 10 of them in one millisecond, read 4 at a time as events.py pages.
    const changes: [string, number][] = Array.from({ length: 30 }, (_, i) => [
      `job_${String(i).padStart(2, "0")}`,
      i < 10 ? 5_000 : 5_000 + i,
    ]);
    await storeJobs(changes);
    const seen: string[] = [];
    let cursor: [number, string] = [0, ""];
    for (;;) {
      const page = await since(cursor[0], cursor[1], 4);
      seen.push(...page.map(([jobId]) => jobId as string));
      if (page.length < 4) break;
      const [jobId, updatedAt] = page.at(-1)!;
      cursor = [updatedAt as number, jobId as string];
    }
    expect(seen).toEqual(changes.map(([jobId]) => jobId));
  });

  test("a status change moves the job into the next poll", async () => {
    const job = await t.mutation(internal.gateway.chargeAndCreateJob, {
      job: {
        jobId: "job_live",
        userId: "user_alice",
        prompt: "A silver drone",
        imageUrl: null,
        durationSec: 5,
        seed: 42,
        cost: 3,
        objectKey: "videos/user_alice/job_live.mp4",
      },
      maxActive: 5,
      signupCredits: 10,
      plan: "free",
    });
    const applied = await t.mutation(internal.gateway.applyStatus, {
      jobId: "job_live",
      status: "running",
    });
    expect(applied.job.updatedAt).toBeGreaterThanOrEqual(job.updatedAt);
    expect(await since(applied.job.updatedAt)).toEqual([["job_live", applied.job.updatedAt]]);
  });

  test("a large burst is cut to one page within the backend's read limits", async () => {
    const many: [string, number][] = Array.from({ length: MAX_UPDATED_JOBS + 50 }, (_, i) => [
      `job_${String(i).padStart(4, "0")}`,
      7_000,
    ]);
    await storeJobs(many);
    const page = await since(7_000, "", 10_000);
    expect(page).toHaveLength(MAX_UPDATED_JOBS);
    expect(page.at(-1)).toEqual([`job_${String(MAX_UPDATED_JOBS - 1).padStart(4, "0")}`, 7_000]);
  });

  test("refuses a limit that is not a positive whole number", async () => {
    await expect(since(0, "", 0)).rejects.toThrow();
  });
});
