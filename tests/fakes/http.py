"""The old import path of ``tests.support.fake_http``, for modules written against it."""

from tests.support.fake_http import FakeHTTPServer as FakeHTTPServer
from tests.support.fake_http import Received as Received
from tests.support.fake_http import Reply as Reply
