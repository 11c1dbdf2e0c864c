// The gateway's API over gRPC-Web on the page's own origin. The session token lives in an httpOnly cookie
// that the browser sends with every call; it never reaches this code.
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AuthService } from "./gen/nsml/v1/auth_pb";
import { LeaderboardService } from "./gen/nsml/v1/leaderboard_pb";
import { SessionService } from "./gen/nsml/v1/session_pb";
import { StorageService } from "./gen/nsml/v1/storage_pb";
import { SubmissionService } from "./gen/nsml/v1/submission_pb";

export const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
});

export const auth: Client<typeof AuthService> = createClient(AuthService, transport);
export const sessions: Client<typeof SessionService> = createClient(SessionService, transport);
export const boards: Client<typeof LeaderboardService> = createClient(LeaderboardService, transport);
export const submissions: Client<typeof SubmissionService> = createClient(SubmissionService, transport);
export const storage: Client<typeof StorageService> = createClient(StorageService, transport);

// Called when any call says the caller is not (or no longer) signed in; the app then shows the sign-in page.
let unauthenticated: () => void = () => {};
export function onUnauthenticated(f: () => void): void {
  unauthenticated = f;
}

export function isAbort(e: unknown): boolean {
  if (e instanceof ConnectError) return e.code === Code.Canceled;
  return e instanceof DOMException && e.name === "AbortError";
}

export function isCode(e: unknown, code: Code): boolean {
  return e instanceof ConnectError && e.code === code;
}

/** The message to show for a failed call: the gateway's own words where it gave some. */
export function errorText(e: unknown): string {
  if (e instanceof ConnectError) {
    if (e.code === Code.Unauthenticated) unauthenticated();
    const msg = e.rawMessage.trim();
    if (msg) return msg;
    return `The platform answered ${Code[e.code] ?? "an error"}.`;
  }
  if (e instanceof Error) return e.message;
  return String(e);
}

/** What the sign-in endpoint answers. */
export interface WebLogin {
  username: string;
  team: string;
  host: boolean;
}

export async function webLogin(username: string, password: string): Promise<WebLogin> {
  let res: Response;
  try {
    res = await fetch("/web/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ username, password }),
    });
  } catch {
    throw new Error("The platform could not be reached. Check that it is running and try again.");
  }
  let body: unknown = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) {
    const msg =
      body && typeof body === "object" && typeof (body as { error?: unknown }).error === "string"
        ? (body as { error: string }).error
        : `Sign-in failed (HTTP ${res.status}).`;
    throw new Error(msg);
  }
  return body as WebLogin;
}

export async function webLogout(): Promise<void> {
  try {
    await fetch("/web/logout", { method: "POST", credentials: "same-origin" });
  } catch {
    // Signing out locally still hides everything; the cookie expires on its own.
  }
}
