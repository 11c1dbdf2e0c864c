// Hash routes: `#/`, `#/board/DATASET[/private]`, `#/submissions[/DATASET]`, `#/sessions`,
// `#/session/TEAM/DATASET/N`, `#/quota`, `#/host[/explain/ID]`.
import { useEffect, useState } from "preact/hooks";

export type Route =
  | { page: "home" }
  | { page: "board"; dataset: string; priv: boolean }
  | { page: "submissions"; dataset: string }
  | { page: "sessions" }
  | { page: "session"; name: string }
  | { page: "quota" }
  | { page: "host"; explain: string }
  | { page: "notfound"; path: string };

function decode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

export function parseRoute(hash: string): Route {
  const path = hash.replace(/^#\/?/, "");
  const parts = path.split("/").filter((p) => p !== "").map(decode);
  const [head, ...rest] = parts;
  switch (head) {
    case undefined:
      return { page: "home" };
    case "board":
      if (rest[0]) return { page: "board", dataset: rest[0], priv: rest[1] === "private" };
      break;
    case "submissions":
      return { page: "submissions", dataset: rest[0] ?? "" };
    case "sessions":
      return { page: "sessions" };
    case "session":
      if (rest.length) return { page: "session", name: rest.join("/") };
      break;
    case "quota":
      return { page: "quota" };
    case "host":
      return { page: "host", explain: rest[0] === "explain" ? rest.slice(1).join("/") : "" };
  }
  return { page: "notfound", path };
}

const enc = (s: string) => encodeURIComponent(s);

export const to = {
  home: () => "#/",
  board: (dataset: string, priv = false) => `#/board/${enc(dataset)}${priv ? "/private" : ""}`,
  submissions: (dataset = "") => (dataset ? `#/submissions/${enc(dataset)}` : "#/submissions"),
  sessions: () => "#/sessions",
  // Session names are TEAM/DATASET/N: each part is encoded, the slashes stay.
  session: (name: string) => `#/session/${name.split("/").map(enc).join("/")}`,
  quota: () => "#/quota",
  host: () => "#/host",
  explain: (id: string) => `#/host/explain/${enc(id)}`,
};

export function navigate(hash: string): void {
  if (location.hash !== hash) location.hash = hash;
}

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parseRoute(location.hash));
  useEffect(() => {
    const on = () => setRoute(parseRoute(location.hash));
    window.addEventListener("hashchange", on);
    return () => window.removeEventListener("hashchange", on);
  }, []);
  return route;
}
