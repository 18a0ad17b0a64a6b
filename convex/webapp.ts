/**
 * Public queries for the web app, signed in with Clerk (see `auth.config.ts`).
 *
 * Every query is scoped to the caller's own Clerk user id (the token's `subject`) and takes no
 * user id argument, so no argument can reach another user's data. Signed out: null or an empty
 * page. Jobs are shown as the gateway's HTTP API shows them (`JobResponse` in `models.py`):
 * `submitting` reads as `queued`, the download URL appears only once the job is done, and the
 * storage key, RunPod id and owner stay inside.
 */
import { paginationOptsValidator } from "convex/server";
import { v } from "convex/values";
import type { Doc } from "./_generated/dataModel";
import { query, type QueryCtx } from "./_generated/server";
import { clampPageSize, fail, isInvalidCursor, publicStatus } from "./model";
import { jobStatus } from "./schema";

async function callerId(ctx: QueryCtx): Promise<string | null> {
  const identity = await ctx.auth.getUserIdentity();
  return identity?.subject ?? null;
}

const myJobRecord = v.object({
  jobId: v.string(),
  status: jobStatus,
  prompt: v.string(),
  imageUrl: v.union(v.string(), v.null()),
  durationSec: v.number(),
  seed: v.number(),
  cost: v.number(),
  // The owner's own bearer link to their video: fine to show them, and only them.
  downloadUrl: v.union(v.string(), v.null()),
  downloadExpiresAt: v.union(v.number(), v.null()),
  error: v.union(v.object({ code: v.string(), detail: v.string() }), v.null()),
  createdAt: v.number(),
  updatedAt: v.number(),
});

function toMyJob(doc: Doc<"jobs">) {
  const done = doc.status === "done";
  return {
    jobId: doc.jobId,
    status: publicStatus(doc.status),
    prompt: doc.prompt,
    imageUrl: doc.imageUrl ?? null,
    durationSec: doc.durationSec,
    seed: doc.seed,
    cost: doc.cost,
    downloadUrl: done ? (doc.downloadUrl ?? null) : null,
    downloadExpiresAt: done ? (doc.downloadExpiresAt ?? null) : null,
    error: doc.errorCode ? { code: doc.errorCode, detail: doc.errorDetail ?? "" } : null,
    createdAt: doc.createdAt,
    updatedAt: doc.updatedAt,
  };
}

export const myCredits = query({
  args: {},
  returns: v.union(v.object({ credits: v.number(), plan: v.string() }), v.null()),
  handler: async (ctx) => {
    const userId = await callerId(ctx);
    if (userId === null) {
      return null;
    }
    const user = await ctx.db
      .query("users")
      .withIndex("by_userId", (q) => q.eq("userId", userId))
      .unique();
    return user === null ? null : { credits: user.credits, plan: user.plan };
  },
});

/** The caller's jobs, newest first, for `usePaginatedQuery`. */
export const myJobs = query({
  args: { paginationOpts: paginationOptsValidator },
  handler: async (ctx, { paginationOpts }) => {
    const userId = await callerId(ctx);
    if (userId === null) {
      return { page: [], isDone: true, continueCursor: "" };
    }
    let result;
    try {
      result = await ctx.db
        .query("jobs")
        .withIndex("by_user_created", (q) => q.eq("userId", userId))
        .order("desc")
        .paginate({ ...paginationOpts, numItems: clampPageSize(paginationOpts.numItems) });
    } catch (error) {
      if (!isInvalidCursor(error)) {
        throw error; // a read limit or a bug must not pass for a bad cursor
      }
      // "InvalidCursor" in the message makes `usePaginatedQuery` start over from the first page.
      throw fail("INVALID_CURSOR", "InvalidCursor: the cursor is malformed");
    }
    return { ...result, page: result.page.map(toMyJob) };
  },
});

/** One of the caller's jobs, or null (also for another user's job). */
export const myJob = query({
  args: { jobId: v.string() },
  returns: v.union(myJobRecord, v.null()),
  handler: async (ctx, { jobId }) => {
    const userId = await callerId(ctx);
    if (userId === null) {
      return null;
    }
    const job = await ctx.db
      .query("jobs")
      .withIndex("by_jobId", (q) => q.eq("jobId", jobId))
      .unique();
    return job === null || job.userId !== userId ? null : toMyJob(job);
  },
});
