"""Tests for signing in on the box: `ocm.py login`, `logout` and `status`.

A fake authorization server (routes on test_ocm's FakeUpstream) plays the
issuer on loopback. Time is a parameter: polls sleep on a fake clock, so no
test waits for the real 5 s interval or 15 minutes.
"""

import json

import pytest

import ocm


# == TestIssuerConfig =======================================================

class TestIssuerConfig:
    def test_issuer_defaults_to_openai(self):
        config = ocm.config_from_dict({})
        assert config.upstream.issuer_url == "https://auth.openai.com"

    def test_issuer_is_configurable_without_trailing_slash(self):
        config = ocm.config_from_dict({"upstream": {"issuer_url": "http://127.0.0.1:9/auth/"}})
        assert config.upstream.issuer_url == "http://127.0.0.1:9/auth"

    @pytest.mark.parametrize("value", ["ftp://auth.example", "auth.openai.com", "https://a.example/?x=1", 5])
    def test_bad_issuer_is_refused_naming_the_key(self, value):
        with pytest.raises(ocm.ConfigError, match=r"upstream\.issuer_url"):
            ocm.config_from_dict({"upstream": {"issuer_url": value}})

    def test_issuer_in_a_config_file(self, tmp_path):
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"upstream": {"issuer_url": "https://login.example"}}))
        assert ocm.load_config(str(path)).upstream.issuer_url == "https://login.example"
