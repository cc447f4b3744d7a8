"""nbval ignores one-time cache notices, and nothing else (conftest.without_cache_notices)."""
import nbformat

from conftest import without_cache_notices


def stream(text, name="stdout"):
    return nbformat.v4.new_output("stream", name=name, text=text)


def test_a_notice_only_stream_is_dropped_and_other_lines_are_kept():
    notice = "fetching Herman Melville's Moby-Dick (npm package) once into /root/.cache/replbook/data/moby-dick\n"
    table = nbformat.v4.new_output("execute_result", data={"text/plain": "a table"}, execution_count=1)
    cold = [stream(notice), table]
    warm = [table]
    assert without_cache_notices(cold) == without_cache_notices(warm) == [table]
    mixed = without_cache_notices([stream("converting tiny from GGUF to safetensors once (about a minute); cached in /x\n"
                                          "final losses: 1.069\n")])
    assert [o["text"] for o in mixed] == ["final losses: 1.069\n"]
    assert cold[0]["text"] == notice, "the notebook's own outputs are not modified"


def test_the_cache_verification_lines_are_notices_too():
    for line in ("cache entry 80eed469527535b8f56f3395.pt predates checksums; hashing it once\n",
                 "cache entry smollm2-135m-a3165e95: model.safetensors fails its sha256 (damaged); building it again\n"):
        assert without_cache_notices([stream(line + "R@1 0.25\n")])[0]["text"] == "R@1 0.25\n"


def test_a_measured_line_that_merely_mentions_fetching_is_still_compared():
    kept = without_cache_notices([stream("fetching took 3 tries; accuracy 0.91\n")])
    assert kept and kept[0]["text"] == "fetching took 3 tries; accuracy 0.91\n"
