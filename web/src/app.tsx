// The signed-in shell: who is signed in, the competition shown, the header and the page for the route.
import { createContext } from "preact";
import type { ComponentType } from "preact";
import { useContext, useEffect, useMemo, useState } from "preact/hooks";
import { Code } from "@connectrpc/connect";
import { auth, boards, errorText, isCode, onUnauthenticated, webLogout } from "./api";
import type { Competition, Identity } from "./gen/nsml/v1/auth_pb";
import { parseRoute, to, useRoute, type Route } from "./router";
import { Loading } from "./components/ui";
import { SignIn } from "./pages/signin";
import { Home } from "./pages/home";
import { Board, boardKey } from "./pages/board";
import { startEarly } from "./live";

/**
 * A page loaded when it is first shown: the overview and the boards come with the first script, the rest
 * (the session page's charts, the host's audit) arrive as their own chunks, so a board paints sooner.
 */
function lazy<P>(load: () => Promise<ComponentType<P>>): ComponentType<P> {
  let loaded: ComponentType<P> | undefined;
  return function Lazy(props: P) {
    const [Page, setPage] = useState<ComponentType<P> | undefined>(() => loaded);
    const [failed, setFailed] = useState<string | null>(null);
    useEffect(() => {
      if (Page) return;
      load().then(
        (c) => {
          loaded = c;
          setPage(() => c);
        },
        (e) => setFailed(errorText(e)),
      );
    }, []);
    if (failed) {
      return (
        <div class="error" role="alert" data-testid="error">
          This page could not be loaded ({failed}). Reload to try again.
        </div>
      );
    }
    return Page ? <Page {...(props as any)} /> : <Loading />;
  };
}

const Submissions = lazy(() => import("./pages/submissions").then((m) => m.Submissions));
const Sessions = lazy(() => import("./pages/sessions").then((m) => m.Sessions));
const SessionPage = lazy(() => import("./pages/session").then((m) => m.SessionPage));
const QuotaPage = lazy(() => import("./pages/quota").then((m) => m.QuotaPage));
const HostPage = lazy(() => import("./pages/host").then((m) => m.HostPage));

export interface AppCtx {
  me: Identity;
  competitions: Competition[];
  /** The competition shown (undefined while none is visible). */
  comp: Competition | undefined;
  /** The signed-in user's team in that competition ("" for a host without one). */
  team: string;
  /** Host of the shown competition (or platform administrator). */
  host: boolean;
  /** Host of any competition. */
  anyHost: boolean;
  setComp(id: string): void;
  reloadCompetitions(): void;
}

const Ctx = createContext<AppCtx | null>(null);

export function useApp(): AppCtx {
  const c = useContext(Ctx);
  if (!c) throw new Error("outside the app");
  return c;
}

const COMP_KEY = "nsml.competition";

/** The list of competitions asked beside `WhoAmI` at start, for the shell's first load. */
let earlyCompetitions: ReturnType<typeof auth.listCompetitions> | undefined;

export function App() {
  const [me, setMe] = useState<Identity | null | undefined>(undefined);
  const [fatal, setFatal] = useState<string | null>(null);
  const [tries, setTries] = useState(0);

  useEffect(() => {
    onUnauthenticated(() => setMe(null));
  }, []);

  useEffect(() => {
    let gone = false;
    setFatal(null);
    // The competitions are asked at the same time: the shell needs them as soon as it knows who is signed in.
    earlyCompetitions = auth.listCompetitions({});
    earlyCompetitions.catch(() => undefined);
    // A board opened by its address is asked at once too: it paints as soon as the shell does.
    const start = parseRoute(location.hash);
    if (start.page === "board") {
      startEarly(boardKey(start.dataset, start.priv), boards.board({ dataset: start.dataset, private: start.priv }));
    }
    auth.whoAmI({}).then(
      (id) => !gone && setMe(id),
      (e) => {
        if (gone) return;
        if (isCode(e, Code.Unauthenticated)) setMe(null);
        else setFatal(errorText(e));
      },
    );
    return () => {
      gone = true;
    };
  }, [tries]);

  if (fatal && me === undefined) {
    return (
      <div class="center-page">
        <div class="card narrow">
          <h1>NSML</h1>
          <div class="error" role="alert" data-testid="error">
            {fatal}
          </div>
          <button class="btn" onClick={() => setTries((n) => n + 1)}>
            Try again
          </button>
        </div>
      </div>
    );
  }
  if (me === undefined) return <div class="center-page"><Loading /></div>;
  if (me === null) return <SignIn onSignedIn={() => setTries((n) => n + 1)} />;
  return <Shell me={me} signOut={() => setMe(null)} />;
}

function Shell(p: { me: Identity; signOut(): void }) {
  const me = p.me;
  const [competitions, setCompetitions] = useState<Competition[]>([]);
  const [compError, setCompError] = useState<string | null>(null);
  const [loaded, setLoaded] = useState(false);
  const [n, setN] = useState(0);
  const [compId, setCompId] = useState<string>(() => localStorage.getItem(COMP_KEY) ?? "");
  const route = useRoute();

  useEffect(() => {
    let gone = false;
    const load = () => {
      const asked = earlyCompetitions ?? auth.listCompetitions({});
      earlyCompetitions = undefined;
      return asked.then(
        (r) => {
          if (gone) return;
          setCompetitions(r.competitions);
          setCompError(null);
          setLoaded(true);
        },
        (e) => {
          if (gone) return;
          setCompError(errorText(e));
          setLoaded(true);
        },
      );
    };
    void load();
    // The private board may be revealed while the page is open.
    const t = setInterval(load, 30_000);
    return () => {
      gone = true;
      clearInterval(t);
    };
  }, [n]);

  const ctx = useMemo<AppCtx>(() => {
    const member = new Set(me.memberships.map((m) => m.competition));
    const chosen =
      competitions.find((c) => c.id === compId) ??
      competitions.find((c) => member.has(c.id)) ??
      competitions[0];
    const team = chosen ? (me.memberships.find((m) => m.competition === chosen.id)?.team ?? "") : (me.memberships[0]?.team ?? "");
    const host = me.admin || (chosen ? me.hosts.includes(chosen.id) || chosen.hosts.includes(me.username) : false);
    return {
      me,
      competitions,
      comp: chosen,
      team,
      host,
      anyHost: me.admin || me.hosts.length > 0,
      setComp: (id: string) => {
        localStorage.setItem(COMP_KEY, id);
        setCompId(id);
      },
      reloadCompetitions: () => setN((x) => x + 1),
    };
  }, [me, competitions, compId]);

  useEffect(() => {
    const c = ctx.comp;
    document.title = c ? `${c.title || c.id} · NSML` : "NSML";
  }, [ctx.comp]);

  const signOut = async () => {
    await webLogout();
    p.signOut();
  };

  return (
    <Ctx.Provider value={ctx}>
      <Header route={route} signOut={signOut} />
      <main class="main">
        {compError && (
          <div class="error" role="alert" data-testid="error">
            {compError}
          </div>
        )}
        {loaded ? <Page route={route} /> : <Loading what="the competition" />}
      </main>
    </Ctx.Provider>
  );
}

function Page(p: { route: Route }) {
  const r = p.route;
  switch (r.page) {
    case "home":
      return <Home />;
    case "board":
      return <Board dataset={r.dataset} priv={r.priv} />;
    case "submissions":
      return <Submissions dataset={r.dataset} />;
    case "sessions":
      return <Sessions />;
    case "session":
      return <SessionPage name={r.name} />;
    case "quota":
      return <QuotaPage />;
    case "host":
      return <HostPage explain={r.explain} />;
    case "notfound":
      return (
        <div class="empty" data-testid="empty">
          <strong>There is no page here.</strong>
          <p>
            Go back to the <a href={to.home()}>competition overview</a>.
          </p>
        </div>
      );
  }
}

function Header(p: { route: Route; signOut(): void }) {
  const app = useApp();
  const page = p.route.page;
  const link = (href: string, label: string, active: boolean, testid: string) => (
    <a href={href} class={active ? "nav-link active" : "nav-link"} data-testid={testid} aria-current={active ? "page" : undefined}>
      {label}
    </a>
  );
  return (
    <header class="header">
      <div class="header-inner">
        <a class="brand" href={to.home()}>
          <span class="logo">NSML</span>
          <span class="comp-title" data-testid="competition-title">
            {app.comp ? app.comp.title || app.comp.id : "No competition"}
          </span>
        </a>
        <nav class="nav">
          {link(to.home(), "Overview", page === "home" || page === "board", "nav-overview")}
          {link(to.submissions(), "Submissions", page === "submissions", "nav-submissions")}
          {link(to.sessions(), "Sessions", page === "sessions" || page === "session", "nav-sessions")}
          {link(to.quota(), "Quota", page === "quota", "nav-quota")}
          {app.anyHost && link(to.host(), "Host", page === "host", "nav-host")}
        </nav>
        <div class="who">
          {app.competitions.length > 1 && (
            <select
              class="comp-select"
              aria-label="Competition"
              data-testid="competition-select"
              value={app.comp?.id ?? ""}
              onChange={(e) => app.setComp((e.target as HTMLSelectElement).value)}
            >
              {app.competitions.map((c) => (
                <option value={c.id} key={c.id}>
                  {c.title || c.id}
                </option>
              ))}
            </select>
          )}
          <span class="user" data-testid="whoami">
            <strong>{app.me.username}</strong>
            {app.team ? <span class="muted"> · {app.team}</span> : app.host ? <span class="muted"> · host</span> : null}
          </span>
          <button class="btn btn-ghost" data-testid="signout" onClick={p.signOut}>
            Sign out
          </button>
        </div>
      </div>
    </header>
  );
}
