// Sign-in: the gateway checks the password and keeps the token in an httpOnly cookie.
import { useState } from "preact/hooks";
import { webLogin } from "../api";

export function SignIn(p: { onSignedIn(): void }) {
  const [username, setUsername] = useState("");
  const [password, setPassword] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (e: Event) => {
    e.preventDefault();
    if (busy) return;
    setBusy(true);
    setError(null);
    try {
      await webLogin(username.trim(), password);
      setPassword("");
      p.onSignedIn();
    } catch (err) {
      setError(err instanceof Error ? err.message : String(err));
      setBusy(false);
    }
  };

  return (
    <div class="center-page signin-page">
      <form class="card narrow signin" onSubmit={submit} data-testid="signin-form">
        <div class="signin-brand">
          <span class="logo">NSML</span>
          <p class="muted">Sign in to see your team's sessions, submissions and the leaderboards.</p>
        </div>
        <label class="field">
          <span>Username</span>
          <input
            name="username"
            autocomplete="username"
            required
            autoFocus
            value={username}
            onInput={(e) => setUsername((e.target as HTMLInputElement).value)}
            data-testid="signin-username"
          />
        </label>
        <label class="field">
          <span>Password</span>
          <input
            name="password"
            type="password"
            autocomplete="current-password"
            required
            value={password}
            onInput={(e) => setPassword((e.target as HTMLInputElement).value)}
            data-testid="signin-password"
          />
        </label>
        {error && (
          <div class="error" role="alert" data-testid="signin-error">
            {error}
          </div>
        )}
        <button class="btn btn-primary btn-block" type="submit" disabled={busy} data-testid="signin-submit">
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
    </div>
  );
}
