"""Discovery benchmark run by ``make bench``: every figure beside a bare grpc.aio echo service.

Not a test suite (pytest ignores this folder): it starts real servers as subprocesses on
127.0.0.1, drives them, prints one markdown table and stops everything it started.
"""
