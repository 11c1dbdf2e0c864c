// The Public/Private switch of the boards.
export function PrivateSwitch(p: { priv: boolean; onChange(priv: boolean): void }) {
  return (
    <div class="segmented" role="group" aria-label="Leaderboard" data-testid="private-switch">
      <button
        type="button"
        class={p.priv ? "" : "on"}
        aria-pressed={!p.priv}
        data-testid="private-switch-public"
        onClick={() => p.onChange(false)}
      >
        Public
      </button>
      <button
        type="button"
        class={p.priv ? "on" : ""}
        aria-pressed={p.priv}
        data-testid="private-switch-private"
        onClick={() => p.onChange(true)}
      >
        Private
      </button>
    </div>
  );
}
