"""Signs of life for long work: a tqdm bar on a terminal; piped, or with --no-progress, a plain
log line every so often, so that a log file shows the work moving too."""

import sys

from tqdm import tqdm


def bar(iterable, total, desc, enabled=True):
    """A tqdm bar over ``iterable`` on a terminal; None (plain log lines instead) when piped or
    not ``enabled``."""
    if not (enabled and sys.stderr.isatty()):
        return None
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=True)


class Ticker:
    """Counts work done toward ``total``: a bar on a terminal, else a line every ``every`` items
    and one at the end, each with the caller's status (the LR and loss of a sweep, say)."""

    def __init__(self, total, desc, every, enabled=True):
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.bar = bar(None, total, desc, enabled)
        self.last_line = 0  # the count the last printed line showed
        self.status = ""

    def step(self, status=""):
        self.done += 1
        self.status = status
        if self.bar is not None:
            self.bar.update()
            if status:
                self.bar.set_postfix_str(status, refresh=False)
        elif self.done % self.every == 0 or self.done == self.total:
            self._line()

    def _line(self):
        print(f"  {self.desc}: {self.done}/{self.total}" + (f", {self.status}" if self.status else ""), flush=True)
        self.last_line = self.done

    def close(self):
        """Ends the bar, or prints the last count where work stopped short of a printed line."""
        if self.bar is not None:
            self.bar.close()
        elif self.done != self.last_line:
            self._line()
