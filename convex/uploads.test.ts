/// <reference types="vite/client" />
import { convexTest } from "convex-test";
import { ConvexError } from "convex/values";
import { beforeEach, describe, expect, test } from "vitest";
import { internal } from "./_generated/api";
import type { ErrorData } from "./model";
import schema from "./schema";

const modules = import.meta.glob("./**/*.*s");
const NOW = 1_764_000_000_000;
const URL_MS = 900_000;
const DAY_MS = 86_400_000;

let t: ReturnType<typeof convexTest<typeof schema.tables>>;

beforeEach(() => {
  // The real backend's per-function limits on, as in gateway.test.ts.
  t = convexTest({ schema, modules, transactionLimits: true });
});

let serial = 0;
function upload(userId: string, createdAt: number) {
  const uploadId = `upl_${String(++serial).padStart(16, "0")}`;
  return {
    uploadId,
    userId,
    contentType: "image/png",
    sizeBytes: 1234,
    objectKey: `uploads/${userId}/${uploadId}`,
    createdAt,
    expiresAt: createdAt + URL_MS,
    usableUntil: createdAt + DAY_MS,
  };
}

async function create(userId: string, createdAt: number, maxPending = 10) {
  return await t.mutation(internal.gateway.createUpload, {
    upload: upload(userId, createdAt),
    maxPending,
  });
}

async function refusal(call: Promise<unknown>): Promise<ErrorData> {
  const error = await call.then(
    () => null,
    (thrown: unknown) => thrown,
  );
  expect(error).toBeInstanceOf(ConvexError);
  return (error as ConvexError<ErrorData>).data;
}

describe("createUpload", () => {
  test("refuses past the pending limit, saying when the oldest URL expires", async () => {
    await create("user_a", NOW, 2);
    await create("user_a", NOW + 60_000, 2);
    const data = await refusal(create("user_a", NOW + 300_000, 2));
    expect(data.code).toBe("TOO_MANY_PENDING_UPLOADS");
    expect(data.retryAfter).toBe(600);
  });

  test("counts only live URLs, however many the user ever made", async () => {
    // 33,000 expired uploads, past the 32,000 documents one function may read: the count must
    // read only the live range (`by_user_expires`), or this call fails on the limits.
    for (let batch = 0; batch < 33; batch++) {
      await t.run(async (ctx) => {
        for (let j = 0; j < 1000; j++) {
          await ctx.db.insert("uploads", upload("user_a", NOW - DAY_MS + batch * 1000 + j));
        }
      });
    }
    const made = await create("user_a", NOW, 1);
    expect(made.userId).toBe("user_a");
  }, 60_000);
});

describe("getUpload", () => {
  test("another user's upload is UPLOAD_NOT_FOUND, as an unknown one", async () => {
    const made = await create("user_a", NOW);
    const theirs = await refusal(
      t.query(internal.gateway.getUpload, { userId: "user_b", uploadId: made.uploadId }),
    );
    const unknown = await refusal(
      t.query(internal.gateway.getUpload, { userId: "user_b", uploadId: "upl_nope" }),
    );
    expect(theirs).toEqual(unknown);
    expect(theirs.code).toBe("UPLOAD_NOT_FOUND");
  });
});

describe("purgeExpiredUploads", () => {
  test("forgets only what no job may use, a batch at a time", async () => {
    await create("user_a", NOW);
    await create("user_a", NOW + 1);
    const fresh = await create("user_a", NOW + DAY_MS);
    const purge = { before: NOW + DAY_MS + 1, limit: 1 };
    expect(await t.mutation(internal.gateway.purgeExpiredUploads, purge)).toBe(1);
    expect(await t.mutation(internal.gateway.purgeExpiredUploads, purge)).toBe(1);
    expect(await t.mutation(internal.gateway.purgeExpiredUploads, purge)).toBe(0);
    const kept = await t.query(internal.gateway.getUpload, {
      userId: "user_a",
      uploadId: fresh.uploadId,
    });
    expect(kept).toEqual(fresh);
  });
});
