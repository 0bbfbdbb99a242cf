"""The example `make demo` deploys: a plain function, a generator, an async function, a class.

ember deploy examples/hello.py
ember call hello/square --data '{"x": 7}'
"""

import asyncio
import time

import ember

app = ember.App("hello", tags={"team": "demo"})


@app.function(max_workers=4, idle_timeout=30)
def square(x: int) -> int:
    """The smallest useful function."""
    return x * x


@app.function(max_workers=4)
def slow_square(x: int, seconds: float = 0.2) -> int:
    """Takes a while, so `.map` shows several workers at once."""
    print(f"squaring {x}")
    time.sleep(seconds)
    return x * x


@app.function()
def countdown(n: int = 5, delay: float = 0.1):
    """A generator: callers see each value as it is yielded."""
    for i in range(n, 0, -1):
        time.sleep(delay)
        yield i


@app.function(concurrency=8)
async def greet(name: str) -> str:
    """Async code runs as tasks: one worker serves `concurrency` calls at once."""
    await asyncio.sleep(0.01)
    return f"hello, {name}"


@app.cls(max_workers=2)
class Counter:
    @ember.enter()
    def load(self) -> None:
        """Runs once per worker before its first job: load models here."""
        self.start = 100

    @ember.method()
    def add(self, n: int) -> int:
        self.start += n
        return self.start


if __name__ == "__main__":
    print(square(3))  # a direct call runs locally
