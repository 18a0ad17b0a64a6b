/**
 * CineWeave's data in Convex: users and their credits, render jobs, and the credit ledger.
 *
 * The shapes mirror `store.py`'s SQLite schema (camelCase here). Every rule about money or
 * limits lives in one mutation in `gateway.ts`, so a rule is always one transaction.
 */
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";

export const jobStatus = v.union(
  v.literal("submitting"),
  v.literal("queued"),
  v.literal("running"),
  v.literal("done"),
  v.literal("failed"),
  v.literal("canceled"),
);

export const ledgerKind = v.union(v.literal("grant"), v.literal("charge"), v.literal("refund"));

export const idempotencyState = v.union(v.literal("in_flight"), v.literal("done"));

export default defineSchema({
  users: defineTable({
    userId: v.string(), // Clerk user id (`user_...`)
    credits: v.number(), // an integer, never negative
    plan: v.string(),
    createdAt: v.number(), // ms since the epoch
    updatedAt: v.number(),
  }).index("by_userId", ["userId"]),

  // Optional fields are absent rather than null; functions hand them back as null.
  jobs: defineTable({
    jobId: v.string(),
    userId: v.string(),
    status: jobStatus,
    prompt: v.string(),
    imageUrl: v.optional(v.string()),
    durationSec: v.number(),
    seed: v.number(),
    cost: v.number(),
    objectKey: v.string(),
    runpodId: v.optional(v.string()),
    errorCode: v.optional(v.string()),
    errorDetail: v.optional(v.string()),
    downloadUrl: v.optional(v.string()),
    downloadExpiresAt: v.optional(v.number()),
    idempotencyKey: v.optional(v.string()), // the Idempotency-Key of the request that created it
    createdAt: v.number(),
    updatedAt: v.number(),
    // The last evidence about the job (a status, a RunPod id, a reconciler's claim): the
    // reconciler checks the active jobs that have gone quiet the longest.
    checkedAt: v.number(),
    // Set when the user deleted the job: a tombstone the ledger's rows still name. Absent on
    // every live job, so `by_user_live_created` holds the live ones in a range of their own.
    deletedAt: v.optional(v.number()),
    // The worker's latest report (0..1, its stage) and when it was written: the throttle.
    progress: v.optional(v.number()),
    stage: v.optional(v.string()),
    progressWrittenAt: v.optional(v.number()),
    // Set when the worker's output says it uploaded the poster; its URL is cached with the video's.
    posterKey: v.optional(v.string()),
    posterUrl: v.optional(v.string()),
  })
    .index("by_jobId", ["jobId"])
    // Convex appends `_creationTime` to every index, so equal `createdAt`s keep insertion order.
    .index("by_user_created", ["userId", "createdAt"])
    .index("by_runpodId", ["runpodId"])
    .index("by_user_status", ["userId", "status"])
    .index("by_status_checked", ["status", "checkedAt"])
    // The user's live jobs by age: `eq("deletedAt", undefined)` selects the documents without
    // the field (`IndexRangeBuilder.eq` takes undefined: convex `src/server/impl/
    // index_range_builder_impl.ts`, `convexOrUndefinedToJson`), so the list never reads a
    // deleted job, however many there are.
    .index("by_user_live_created", ["userId", "deletedAt", "createdAt"])
    // The gateway's event streams poll every job changed since a moment (`jobsUpdatedSince`).
    .index("by_updated", ["updatedAt", "jobId"]),

  // One row per (user, Idempotency-Key): the first request's fingerprint, and once it is done,
  // the response to replay. Rows expire; `purgeIdempotencyKeys` deletes them.
  idempotency: defineTable({
    userId: v.string(),
    key: v.string(),
    fingerprint: v.string(), // a hash of the request, so a reused key with another body is caught
    state: idempotencyState,
    statusCode: v.optional(v.number()), // set when done
    body: v.optional(v.string()), // the response's JSON text, set when done
    jobId: v.optional(v.string()), // the job the request charged for, once it has
    claimedAt: v.number(), // ms; an in-flight claim older than the caller's staleMs is dead
    expiresAt: v.number(),
  })
    .index("by_user_key", ["userId", "key"])
    .index("by_expires", ["expiresAt"]),

  // Images users upload straight to storage for jobs to start from (`uploads.py`). An upload
  // costs nothing, so it creates no user. Rows are purged once no job may use them.
  uploads: defineTable({
    uploadId: v.string(),
    userId: v.string(),
    contentType: v.string(),
    sizeBytes: v.number(), // declared, and signed into the upload URL
    objectKey: v.string(),
    createdAt: v.number(),
    expiresAt: v.number(), // the upload URL stops working; until then the upload is pending
    usableUntil: v.number(), // jobs may use it until then
  })
    .index("by_uploadId", ["uploadId"])
    .index("by_user_expires", ["userId", "expiresAt"])
    .index("by_usableUntil", ["usableUntil"]),

  // Append-only. A job has at most one `charge` and one `refund` row.
  ledger: defineTable({
    userId: v.string(),
    jobId: v.optional(v.string()),
    kind: ledgerKind,
    amount: v.number(), // an integer >= 0
    reason: v.string(),
    createdAt: v.number(),
  })
    .index("by_job_kind", ["jobId", "kind"])
    .index("by_user", ["userId"]),
});
