"""The producer side: the Python client and the ``cascade`` command line. Imports only the
contract.
"""
