"""``llmq chat``: a terminal chat client of llmq's own OpenAI API.

It talks to the API with the official ``openai`` SDK, like any other client,
so it exercises exactly what users get. Answers stream; on a terminal they are
rendered as Markdown with rich, through a pipe they are plain text written as
it comes. FastChat's commands work: ``!!exit``, ``!!reset``, ``!!remove``,
``!!regen``, ``!!save FILE``, ``!!load FILE``. Ctrl-C during an answer closes
the stream, which makes the API cancel the job; Ctrl-C or Ctrl-D at the prompt
exits.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import openai
from openai import OpenAI

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

PROMPT = "USER: "
MORE = "...   "  # continuation prompt in --multiline mode
ASSISTANT = "ASSISTANT"
HELP = "commands: !!exit  !!reset  !!remove  !!regen  !!save FILE  !!load FILE; Ctrl-C stops an answer"

Message = dict[str, str]
Add = Callable[[str], None]  # takes each new piece of an answer as it streams


@dataclass(frozen=True, kw_only=True)
class ChatOptions:
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str = "none"
    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    no_history: bool = False
    multiline: bool = False


@dataclass
class Conversation:
    """The system prompt apart from the turns, so ``!!reset`` keeps it and a
    saved file shows both plainly."""

    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def request(self, no_history: bool) -> list[Message]:
        # With --no-history the turns are still kept (for !!save, !!regen),
        # only the last user message is sent.
        turns = self.messages[-1:] if no_history else self.messages
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def save(self, path: Path, model: str) -> None:
        data = {"model": model, "system": self.system, "messages": self.messages}
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Conversation:
        data = json.loads(path.read_text(encoding="utf-8"))
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError('expected {"system": ..., "messages": [{"role": "user" or "assistant", "content": ...}]}')
        system = data.get("system")
        return cls(system=system if isinstance(system, str) else None,
                   messages=[{"role": m["role"], "content": m["content"]} for m in messages])


class View(Protocol):
    """Where the conversation is shown: rich on a terminal, plain text otherwise."""

    def answer(self) -> AbstractContextManager[Add]: ...
    def turn(self, message: Message) -> None: ...
    def notice(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...


class PlainView:
    """No ANSI codes: text goes out as it streams, so a pipe sees it at once."""

    def __init__(self, labels: bool) -> None:
        self.labels = labels  # role labels only when someone types at a prompt

    @contextmanager
    def answer(self) -> Iterator[Add]:
        if self.labels:
            sys.stdout.write(f"{ASSISTANT}: ")

        def add(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        try:
            yield add
        finally:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def turn(self, message: Message) -> None:
        label = PROMPT if message["role"] == "user" else f"{ASSISTANT}: "
        print(f"{label}{message['content']}")

    def notice(self, text: str) -> None:
        print(text, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=sys.stderr, flush=True)


class RichView:
    """Markdown re-rendered in place (rich.live.Live) as the answer grows."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    @contextmanager
    def answer(self) -> Iterator[Add]:
        from rich.live import Live
        from rich.markdown import Markdown

        self.console.print(f"[bold green]{ASSISTANT}:[/]")
        text = ""
        # Default overflow ("ellipsis") keeps the screen still while a long
        # answer streams; Live.stop() draws the whole answer once at the end.
        with Live(Markdown(""), console=self.console, refresh_per_second=8) as live:

            def add(piece: str) -> None:
                nonlocal text
                text += piece
                live.update(Markdown(text))

            yield add

    def turn(self, message: Message) -> None:
        from rich.markdown import Markdown
        from rich.markup import escape

        if message["role"] == "user":
            # The label is styled apart from the space after it, so the raw
            # output holds the exact prompt text only where input() waits.
            self.console.print(f"[bold]{PROMPT.rstrip()}[/] {escape(message['content'])}")
        else:
            self.console.print(f"[bold green]{ASSISTANT}:[/]")
            self.console.print(Markdown(message["content"]))

    def notice(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(f"[dim]{escape(text)}[/]")

    def error(self, text: str) -> None:
        from rich.markup import escape

        self.err.print(f"[bold red]error:[/] {escape(text)}")


def describe(exc: openai.APIError) -> str:
    """One readable line. The SDK's own message for an HTTP error is
    ``Error code: 404 - {...dict...}``; the server's message is in ``body``."""
    body = exc.body if isinstance(exc.body, dict) else {}
    message = str(body.get("message") or exc.message)
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach {exc.request.url}: {message}"
    status = getattr(exc, "status_code", None)  # only APIStatusError has one
    head = " ".join(str(p) for p in (status, exc.code or exc.type) if p)
    return f"{head}: {message}" if head else message


def first_chat_model(client: OpenAI) -> str | None:
    """The first model whose card says ``kind: chat`` (llmq's extension); a
    card without ``kind`` (another OpenAI server) counts as chat."""
    for card in client.models.list().data:
        if (card.model_extra or {}).get("kind", "chat") == "chat":
            return card.id
    return None


def read_input(multiline: bool, interactive: bool) -> str:
    """One user input; raises EOFError / KeyboardInterrupt to end the session."""
    prompt = PROMPT if interactive else ""
    first = input(prompt)
    if not multiline or first.startswith("!!"):
        return first
    lines = [first]
    while True:
        try:
            line = input(MORE if interactive else "")
        except EOFError:
            break  # Ctrl-D ends a multi-line input like an empty line does
        if not line:
            break
        lines.append(line)
    return "\n".join(lines).strip("\n")


class Chat:
    def __init__(self, client: OpenAI, model: str, opts: ChatOptions, view: View) -> None:
        self.client, self.model, self.opts, self.view = client, model, opts, view
        self.conv = Conversation(system=opts.system)

    def ask(self) -> None:
        """Answer the last user message; the answer (or what was shown of it
        before Ctrl-C) becomes the next turn."""
        text, stream = "", None
        try:
            # An unset option goes out as null, which OpenAI's schema allows:
            # the server's default applies.
            messages = cast("list[ChatCompletionMessageParam]", self.conv.request(self.opts.no_history))
            stream = self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True,
                temperature=self.opts.temperature, max_tokens=self.opts.max_tokens)
            with self.view.answer() as add:
                for chunk in stream:
                    piece = chunk.choices[0].delta.content if chunk.choices else None
                    if piece:
                        text += piece
                        add(piece)
        except KeyboardInterrupt:
            self.view.notice("(stopped)")
        except openai.APIError as exc:
            self.view.error(describe(exc))
            text = ""  # a failed turn is dropped whole, so history stays user/assistant pairs
        finally:
            if stream is not None:
                stream.close()  # the API cancels the job when its client disconnects
        if text:
            self.conv.messages.append({"role": "assistant", "content": text})
        else:
            self.conv.messages.pop()

    def command(self, line: str) -> bool:
        """Run one ``!!`` command; False ends the session."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        msgs = self.conv.messages
        if name == "!!exit":
            return False
        if name == "!!reset":
            msgs.clear()
            self.view.notice("conversation cleared")
        elif name == "!!remove":
            if not msgs:
                self.view.notice("nothing to remove")
                return True
            del msgs[-2 if len(msgs) >= 2 and msgs[-1]["role"] == "assistant" else -1:]
            self.view.notice(f"removed the last turn; {len(msgs) // 2} left")
            self.show_history()
        elif name == "!!regen":
            if msgs and msgs[-1]["role"] == "assistant":
                msgs.pop()
            if not msgs:
                self.view.notice("nothing to regenerate")
            else:
                self.view.turn(msgs[-1])
                self.ask()
        elif name in ("!!save", "!!load"):
            if not arg:
                self.view.notice(f"usage: {name} FILE")
                return True
            try:
                if name == "!!save":
                    self.conv.save(Path(arg), self.model)
                    self.view.notice(f"saved {len(msgs)} messages to {arg}")
                else:
                    self.conv = Conversation.load(Path(arg))
                    self.view.notice(f"loaded {len(self.conv.messages)} messages from {arg}")
                    self.show_history()
            except (OSError, ValueError) as exc:
                self.view.error(f"{name} {arg}: {exc}")
        else:
            self.view.notice(HELP)
        return True

    def show_history(self) -> None:
        for message in self.conv.messages:
            self.view.turn(message)

    def loop(self, interactive: bool) -> None:
        while True:
            try:
                line = read_input(self.opts.multiline, interactive)
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    print()  # leave the shell prompt on a line of its own
                return
            if line.startswith("!!"):
                if not self.command(line.strip()):
                    return
            elif line.strip():
                self.conv.messages.append({"role": "user", "content": line})
                self.ask()


def run(opts: ChatOptions) -> int:
    # Ctrl-C is this command's own feature, so it sets its handler itself: a
    # parent that ignores SIGINT (a non-interactive shell's background job)
    # leaves it ignored in Python, and Ctrl-C would then do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interactive = sys.stdin.isatty()
    view: View = RichView() if sys.stdout.isatty() else PlainView(labels=interactive)
    # No silent retries: a user at a prompt should see a 503 or 429 at once.
    client = OpenAI(base_url=opts.base_url, api_key=opts.api_key, max_retries=0)
    model = opts.model
    if model is None:
        try:
            model = first_chat_model(client)
        except openai.APIError as exc:
            view.error(describe(exc))
            return 1
        except KeyboardInterrupt:
            return 130
        if model is None:
            view.error(f"no chat model is served at {opts.base_url}")
            return 1
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        view.notice(f"llmq chat: {model} at {opts.base_url}; {HELP}")
    Chat(client, model, opts, view).loop(interactive)
    return 0
