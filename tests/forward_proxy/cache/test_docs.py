"""Every option of the project's addons is documented: in docs/configuration.md (the reference), or, for
an option added since, in the table of its owner's page (configuration.md then links there); and every
launcher flag is in docs/configuration.md."""

from __future__ import annotations

import asyncio
import re

from forward_proxy.launcher import FLAGS
from tests.support.processes import REPO

CONFIGURATION = REPO / "docs" / "configuration.md"


def project_options() -> set[str]:
    """Names of the options the project's addons add to mitmproxy's own."""
    return set(project_option_helps())


def project_option_helps() -> dict[str, str]:
    """The help text (what `mitmdump --options` shows) of each option the project's addons add."""

    async def collect() -> dict[str, str]:
        from mitmproxy import options
        from mitmproxy.tools.dump import DumpMaster

        from forward_proxy import addons
        from forward_proxy.privacy.addon import Privacy
        from forward_proxy.protocolerrors import ProtocolErrors

        builtin = options.Options()
        DumpMaster(builtin)
        extended = options.Options()
        DumpMaster(extended).addons.add(*addons.addons)
        for addon in addons.addons:
            if isinstance(addon, Privacy | ProtocolErrors):
                addon.done()  # what they install (a log filter, error pages) must not outlive this test
        return {name: option.help for name, option in extended.items() if name not in builtin}

    return asyncio.run(collect())


def documented_in(text: str) -> set[str]:
    """Option names in the first column of a Markdown table."""
    return set(re.findall(r"^\| `([a-z_]+)`", text, re.MULTILINE))


def test_every_project_option_is_documented() -> None:
    documented = documented_in(CONFIGURATION.read_text())
    for page in (REPO / "docs").glob("*.md"):
        documented |= documented_in(page.read_text())
    missing = project_options() - documented
    assert not missing, (
        f"document these options in a table of docs/configuration.md or your page: {sorted(missing)}"
    )


def test_the_cache_options_are_in_the_reference() -> None:
    from forward_proxy.cache.config import OPTIONS

    documented = documented_in(CONFIGURATION.read_text())
    assert {option.name for option in OPTIONS} | {"intercept_hosts"} <= documented


def test_every_launcher_flag_is_documented() -> None:
    text = CONFIGURATION.read_text()
    for flag in FLAGS:
        assert f"`{flag.flag} " in text, flag.flag


def test_every_project_option_has_a_help_sentence() -> None:
    helps = project_option_helps()
    # One option of each addon that adds some, so an empty collection cannot pass.
    assert {"cache_ttl", "intercept_hosts", "allow_clients", "egress_allow", "pseudonym_key"} <= set(helps)
    assert {"access_log", "admin_port"} <= set(helps)
    for name, text in helps.items():
        sentence = " ".join(text.split())
        assert len(sentence) >= 30 and len(sentence.split()) >= 4, (name, text)
        assert sentence[0].isupper() and sentence.endswith((".", ")")), (name, text)
