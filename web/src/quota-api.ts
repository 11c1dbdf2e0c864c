// The quota service's client, apart from `api.ts`: only the quota and host pages (their own chunks) load it.
import { createClient, type Client } from "@connectrpc/connect";
import { transport } from "./api";
import { QuotaService } from "./gen/nsml/v1/quota_pb";

export const quota: Client<typeof QuotaService> = createClient(QuotaService, transport);
