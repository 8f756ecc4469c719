"""A local OpenAI-compatible server that replays recorded answers (tests start it themselves).

Answers are chosen by the strategy named in the system prompt and by the turn (how many assistant
messages the conversation already holds), so parallel agents get deterministic answers. An answer
of `HTTP 500` makes the server fail that request; a dict answer is the whole message (tool calls). Every request body is kept for the test to read.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ReplayServer:
    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.requests.append(body)
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                messages = body.get("messages", [])
                system = next((m["content"] for m in messages if m["role"] == "system"), "")
                strategy = next((s for s in server.answers if f"Strategy ({s})" in system), None)
                turn = sum(m["role"] == "assistant" for m in messages)
                script = server.answers.get(strategy, [])
                answer = script[turn] if turn < len(script) else "I have nothing more to add."
                if answer == "HTTP 500":
                    return self._send(500, {"error": {"message": "replayed failure", "type": "server_error"}})
                return self._send(
                    200,
                    {
                        "id": f"replay-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "replay"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "tool_calls" if isinstance(answer, dict) else "stop",
                                "message": answer
                                if isinstance(answer, dict)
                                else {"role": "assistant", "content": answer},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, code: int, doc: dict):
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ReplayServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
