"""Protocol v3 constants: request codes, message type bytes, limits."""

from __future__ import annotations

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

MAX_STARTUP_PACKET_LENGTH = 10000  # PostgreSQL's own limit (pqcomm.h)
SMALL_MESSAGE_LIMIT = 10000  # largest message accepted before authentication completes
LARGE_MESSAGE_LIMIT = 1073741822  # 1 GB - 2, PostgreSQL's limit after authentication

# Backend (server -> client) message types
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
COMMAND_COMPLETE = ord("C")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
DATA_ROW = ord("D")
EMPTY_QUERY_RESPONSE = ord("I")
ERROR_RESPONSE = ord("E")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
NO_DATA = ord("n")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
PARAMETER_DESCRIPTION = ord("t")
PARAMETER_STATUS = ord("S")
PARSE_COMPLETE = ord("1")
PORTAL_SUSPENDED = ord("s")
READY_FOR_QUERY = ord("Z")
ROW_DESCRIPTION = ord("T")

# Frontend (client -> server) message types
BIND = ord("B")
CLOSE = ord("C")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
DESCRIBE = ord("D")
EXECUTE = ord("E")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
PARSE = ord("P")
PASSWORD = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse
QUERY = ord("Q")
SYNC = ord("S")
TERMINATE = ord("X")

FRONTEND_TYPES = frozenset(
    [BIND, CLOSE, COPY_DATA, COPY_DONE, COPY_FAIL, DESCRIBE, EXECUTE, FLUSH, FUNCTION_CALL,
     PARSE, PASSWORD, QUERY, SYNC, TERMINATE]
)

# Authentication request codes (the Int32 after 'R')
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# Transaction status in ReadyForQuery
TX_IDLE = ord("I")
TX_IN_BLOCK = ord("T")
TX_FAILED = ord("E")
