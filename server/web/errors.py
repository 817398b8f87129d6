"""How a page says no: `PageError` (an error page with a status) and `LoginRequired`."""

from __future__ import annotations


class PageError(Exception):
    """A page's refusal, shown as the error page with `status_code` and `message`."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class LoginRequired(Exception):
    """No live session: the browser is sent to /login, then back to `next_path`."""

    def __init__(self, next_path: str | None) -> None:
        super().__init__("sign in first")
        self.next_path = next_path


__all__ = ["LoginRequired", "PageError"]
