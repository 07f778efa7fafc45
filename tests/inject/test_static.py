"""Header injection renders its value once per material (a secret version or a token), and a new
version is what the next request carries."""

from multidict import CIMultiDict
from yarl import URL

from proxy.inject import HeaderInjector
from proxy.store.secret import Secret, SecretRef
from proxy.template import Template
from proxy.upstream.outbound import Outbound


def _sent(injector: HeaderInjector, material) -> list[str]:
    out = Outbound("GET", URL("https://api.example"), "/", "", CIMultiDict({"Authorization": "Bearer caller-own"}))
    injector.inject(out, material)
    return out.headers.getall("Authorization")


def test_a_rotated_secret_is_sent_from_the_next_request_on():
    injector = HeaderInjector("Authorization", Template.parse("Bearer {secret}"))
    v1 = {"secret": Secret("sk_one")}
    assert _sent(injector, v1) == _sent(injector, v1) == ["Bearer sk_one"]
    assert _sent(injector, {"secret": Secret("sk_two")}) == ["Bearer sk_two"]
    assert _sent(injector, v1) == ["Bearer sk_one"]


def test_many_principals_each_get_their_own_value():
    template = Template.parse("{secret}:{secret:apis/x#id}")
    injector = HeaderInjector("X-Key", template)
    materials = [{"secret": Secret(f"s{n}"), "apis/x#id": Secret(f"id{n}")} for n in range(3 * HeaderInjector.RENDERED_MAX)]
    for _ in range(2):
        for n, material in enumerate(materials):
            out = Outbound("GET", URL("https://api.example"), "/", "", CIMultiDict())
            injector.inject(out, material)
            assert out.headers.getall("X-Key") == [f"s{n}:id{n}"]
    assert SecretRef.parse("apis/x#id") in template.refs


def test_basic_and_query_values_follow_a_rotation():
    from proxy.inject import BasicInjector, QueryInjector

    basic, query = BasicInjector(), QueryInjector("api_key")

    def sent(material):
        out = Outbound("GET", URL("https://api.example"), "/", "api_key=caller&x=1",
                       CIMultiDict({"Authorization": "Basic Y2FsbGVyOm93bg=="}))
        basic.inject(out, material)
        query.inject(out, material)
        return out.headers.getall("Authorization"), out.query

    v1 = {"username": Secret("u1"), "password": Secret("p 1"), "secret": Secret("k/1")}
    v2 = {"username": Secret("u2"), "password": Secret("p2"), "secret": Secret("k2")}
    assert sent(v1) == sent(v1) == (["Basic dTE6cCAx"], "x=1&api_key=k%2F1")
    assert sent(v2) == (["Basic dTI6cDI="], "x=1&api_key=k2")
    assert sent(v1) == (["Basic dTE6cCAx"], "x=1&api_key=k%2F1")
