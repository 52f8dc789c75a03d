"""A custom shared type: a leaderboard registered with a Manager, updated by tasks.

``Manager.register`` hosts objects of the class on this client; proxies to them
work from any node, so cluster tasks can call its methods.

Run: python examples/custom_type.py
"""

from fabric.remote import Manager


class Leaderboard:
    def __init__(self) -> None:
        self.scores: dict[str, int] = {}

    def record(self, player: str, points: int) -> int:
        self.scores[player] = self.scores.get(player, 0) + points
        return self.scores[player]

    def top(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def play(board, player: str, rounds: int) -> int:  # type: ignore[no-untyped-def]
    for r in range(rounds):
        board.record(player, r)
    return rounds


def main() -> None:
    players = ["ada", "grace", "linus", "guido"]
    with Manager() as mgr:
        mgr.register("Leaderboard", Leaderboard)
        board = mgr.Leaderboard(name="league")
        with mgr.Executor() as ex:
            list(ex.map(play, [board] * 4, players, [5, 10, 15, 20]))
        top = board.top(2)
    assert top == [("guido", 190), ("linus", 105)], top
    print("top two:", top)


if __name__ == "__main__":
    main()
