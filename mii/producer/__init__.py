"""The client library: submit prompts to a deployment's streams and read the answers.

`mii.client(name)` / `mii.serve(...)` return a `mii.producer.client.Client`.
"""
