/* The guest agent's wire protocol (docs/AGENT.md), shared by the agent (C, static, in the
 * guest) and the host client (cli/agent_client.cc). Only encoding, decoding and validation
 * live here; no I/O. Every decoder bounds every read by the frame it was given and rejects
 * trailing bytes, so a hostile peer gets an error code, never an out-of-bounds access.
 *
 * A frame: an 8-byte header (le16 version, le16 type, le32 payload length) and the payload.
 * One connection carries one request: PING, EXEC (then STDIN/STDIN_EOF from the host,
 * STDOUT/STDERR/EXIT or ERROR from the agent) or IDENTITY. */
#ifndef CLONE_AGENT_PROTOCOL_H
#define CLONE_AGENT_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CA_PORT 1024u
#define CA_VERSION 1u
#define CA_HEADER_SIZE 8u
#define CA_MAX_PAYLOAD 65536u
#define CA_MAX_ARGS 4096u     /* argv entries, and separately env entries */
#define CA_MAX_HOSTNAME 64u   /* HOST_NAME_MAX */
#define CA_MAX_SEED 512u      /* bytes of RNG seed */
#define CA_MAX_ERROR_TEXT 1024u

enum ca_type {
  CA_PING = 1,            /* host: any payload; answered by PONG with the same bytes */
  CA_PONG = 2,
  CA_EXEC = 3,            /* host: ca_exec */
  CA_STDIN = 4,           /* host: bytes for the command's stdin (1..MAX_PAYLOAD) */
  CA_STDIN_EOF = 5,       /* host: empty; closes the command's stdin */
  CA_STDOUT = 6,          /* agent: bytes the command wrote */
  CA_STDERR = 7,
  CA_EXIT = 8,            /* agent: ca_exit; the last frame of an EXEC */
  CA_IDENTITY = 9,        /* host: ca_identity */
  CA_IDENTITY_RESULT = 10,/* agent: ca_identity_result */
  CA_ERROR = 11,          /* agent: le32 errno, then text; the request failed */
};

enum ca_status {
  CA_OK = 0,
  CA_E_VERSION = -1,      /* header version is not CA_VERSION */
  CA_E_TYPE = -2,         /* unknown frame type */
  CA_E_LENGTH = -3,       /* payload longer than CA_MAX_PAYLOAD or wrong for its type */
  CA_E_TRUNCATED = -4,    /* a field runs past the end of the payload */
  CA_E_TRAILING = -5,     /* bytes left after the last field */
  CA_E_VALUE = -6,        /* a field's value is out of range (count, NUL in a string, ...) */
  CA_E_NOMEM = -7,
};
const char* ca_status_text(int status);

struct ca_header {
  uint16_t version;
  uint16_t type;
  uint32_t length;
};
void ca_encode_header(uint8_t out[CA_HEADER_SIZE], uint16_t type, uint32_t length);
/* Checks version, type and length; CA_OK or a negative ca_status. */
int ca_decode_header(const uint8_t in[CA_HEADER_SIZE], struct ca_header* header);

/* EXEC: le32 flags (bit 0: env given), le32 argc, le32 envc, then argc + envc strings,
 * each le32 length + bytes (no NUL; env entries contain '='). argc >= 1. Without env the
 * agent's own environment is used (PATH=/usr/sbin:/usr/bin:/sbin:/bin, HOME=/root). */
#define CA_EXEC_ENV 1u
struct ca_exec {
  int has_env;
  uint32_t argc, envc;
  char** argv;  /* NULL-terminated; argv, env and the strings are one allocation */
  char** env;   /* NULL-terminated, or NULL */
};
/* Decodes into one malloc'd block (free(exec->argv)). */
int ca_decode_exec(const uint8_t* payload, size_t length, struct ca_exec* exec);
/* Encodes into out (capacity cap); returns the length, or a negative ca_status
 * (CA_E_LENGTH when it does not fit in one frame). */
long ca_encode_exec(uint8_t* out, size_t cap, const char* const* argv, uint32_t argc,
                    const char* const* env, uint32_t envc, int has_env);

/* EXIT: le32 kind (0 exited, 1 killed by a signal), le32 value (exit code or signal). */
#define CA_EXIT_SIZE 8u
struct ca_exit {
  uint32_t kind;
  int32_t value;
};
void ca_encode_exit(uint8_t out[CA_EXIT_SIZE], const struct ca_exit* exit_status);
int ca_decode_exit(const uint8_t* payload, size_t length, struct ca_exit* exit_status);

/* IDENTITY: le32 fields, le32 hostname length + bytes, le32 seed length + bytes,
 * le64 clock seconds (signed), le32 clock nanoseconds. Absent fields have length 0 / 0. */
#define CA_ID_HOSTNAME 1u
#define CA_ID_SEED 2u
#define CA_ID_CLOCK 4u
struct ca_identity {
  uint32_t fields;
  uint32_t hostname_length;
  char hostname[CA_MAX_HOSTNAME + 1];
  uint32_t seed_length;
  uint8_t seed[CA_MAX_SEED];
  int64_t clock_seconds;
  uint32_t clock_nanoseconds;
};
#define CA_IDENTITY_MAX_SIZE (4 + 4 + CA_MAX_HOSTNAME + 4 + CA_MAX_SEED + 8 + 4)
int ca_decode_identity(const uint8_t* payload, size_t length, struct ca_identity* identity);
long ca_encode_identity(uint8_t* out, size_t cap, const struct ca_identity* identity);

/* IDENTITY_RESULT: what was applied and what the guest reads back afterwards.
 * le32 applied (CA_ID_* bits that succeeded), le32 hostname_error, le32 seed_error,
 * le32 reseed_error, le32 clock_error (errnos, 0 = fine; reseed_error is RNDRESEEDCRNG's),
 * le32 entropy_avail (-1 unknown), le32 crng_ready (1 ready, 0 not, -1 unknown),
 * le64 clock seconds, le32 clock nanoseconds (CLOCK_REALTIME read back),
 * le32 hostname length + bytes (uname's nodename read back). */
struct ca_identity_result {
  uint32_t applied;
  int32_t hostname_error, seed_error, reseed_error, clock_error;
  int32_t entropy_avail, crng_ready;
  int64_t clock_seconds;
  uint32_t clock_nanoseconds;
  uint32_t hostname_length;
  char hostname[CA_MAX_HOSTNAME + 1];
};
#define CA_IDENTITY_RESULT_MAX_SIZE (7 * 4 + 8 + 4 + 4 + CA_MAX_HOSTNAME)
long ca_encode_identity_result(uint8_t* out, size_t cap, const struct ca_identity_result* r);
int ca_decode_identity_result(const uint8_t* payload, size_t length, struct ca_identity_result* r);

/* ERROR: le32 errno, then up to CA_MAX_ERROR_TEXT bytes of text (no NUL). */
long ca_encode_error(uint8_t* out, size_t cap, int32_t error, const char* text);
/* text gets a NUL-terminated copy (capacity CA_MAX_ERROR_TEXT + 1). */
int ca_decode_error(const uint8_t* payload, size_t length, int32_t* error, char* text);

#ifdef __cplusplus
}
#endif

#endif
