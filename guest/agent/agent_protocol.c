#include "agent_protocol.h"

#include <stdlib.h>
#include <string.h>

/* ---- bounded little-endian reader and writer ---- */

struct reader {
  const uint8_t* p;
  size_t left;
  int status;  /* first error */
};

static const uint8_t* take(struct reader* r, size_t n) {
  if (r->status != CA_OK) return NULL;
  if (n > r->left) {
    r->status = CA_E_TRUNCATED;
    return NULL;
  }
  const uint8_t* p = r->p;
  r->p += n;
  r->left -= n;
  return p;
}

static uint32_t get_u32(struct reader* r) {
  const uint8_t* p = take(r, 4);
  if (!p) return 0;
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(struct reader* r) {
  uint64_t low = get_u32(r);
  uint64_t high = get_u32(r);
  return low | high << 32;
}

static int finish(struct reader* r) {
  if (r->status == CA_OK && r->left != 0) r->status = CA_E_TRAILING;
  return r->status;
}

struct writer {
  uint8_t* p;
  size_t cap;
  size_t len;
  int overflow;
};

static void put(struct writer* w, const void* bytes, size_t n) {
  if (w->overflow || n > w->cap - w->len) {
    w->overflow = 1;
    return;
  }
  if (n) memcpy(w->p + w->len, bytes, n);
  w->len += n;
}

static void put_u32(struct writer* w, uint32_t v) {
  uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
  put(w, b, 4);
}

static void put_u64(struct writer* w, uint64_t v) {
  put_u32(w, (uint32_t)v);
  put_u32(w, (uint32_t)(v >> 32));
}

static long written(const struct writer* w) {
  if (w->overflow || w->len > CA_MAX_PAYLOAD) return CA_E_LENGTH;
  return (long)w->len;
}

const char* ca_status_text(int status) {
  switch (status) {
    case CA_OK: return "ok";
    case CA_E_VERSION: return "unsupported protocol version";
    case CA_E_TYPE: return "unknown frame type";
    case CA_E_LENGTH: return "frame length out of range";
    case CA_E_TRUNCATED: return "truncated frame";
    case CA_E_TRAILING: return "trailing bytes in frame";
    case CA_E_VALUE: return "field value out of range";
    case CA_E_NOMEM: return "out of memory";
  }
  return "unknown error";
}

/* ---- header ---- */

void ca_encode_header(uint8_t out[CA_HEADER_SIZE], uint16_t type, uint32_t length) {
  out[0] = (uint8_t)CA_VERSION;
  out[1] = (uint8_t)(CA_VERSION >> 8);
  out[2] = (uint8_t)type;
  out[3] = (uint8_t)(type >> 8);
  out[4] = (uint8_t)length;
  out[5] = (uint8_t)(length >> 8);
  out[6] = (uint8_t)(length >> 16);
  out[7] = (uint8_t)(length >> 24);
}

int ca_decode_header(const uint8_t in[CA_HEADER_SIZE], struct ca_header* h) {
  h->version = (uint16_t)(in[0] | in[1] << 8);
  h->type = (uint16_t)(in[2] | in[3] << 8);
  h->length = (uint32_t)in[4] | (uint32_t)in[5] << 8 | (uint32_t)in[6] << 16 | (uint32_t)in[7] << 24;
  if (h->version != CA_VERSION) return CA_E_VERSION;
  if (h->type < CA_PING || h->type > CA_ERROR) return CA_E_TYPE;
  if (h->length > CA_MAX_PAYLOAD) return CA_E_LENGTH;
  switch (h->type) {
    case CA_STDIN_EOF:
      if (h->length != 0) return CA_E_LENGTH;
      break;
    case CA_STDIN:
      if (h->length == 0) return CA_E_LENGTH;
      break;
    case CA_EXIT:
      if (h->length != CA_EXIT_SIZE) return CA_E_LENGTH;
      break;
    case CA_EXEC:
      if (h->length < 12) return CA_E_LENGTH;
      break;
    case CA_IDENTITY:
      if (h->length > CA_IDENTITY_MAX_SIZE) return CA_E_LENGTH;
      break;
    case CA_IDENTITY_RESULT:
      if (h->length > CA_IDENTITY_RESULT_MAX_SIZE) return CA_E_LENGTH;
      break;
    case CA_ERROR:
      if (h->length < 4 || h->length > 4 + CA_MAX_ERROR_TEXT) return CA_E_LENGTH;
      break;
    default:
      break;
  }
  return CA_OK;
}

/* ---- EXEC ---- */

/* Checks one string of the list and returns its length; sets r->status on bad input. */
static uint32_t get_string(struct reader* r, const uint8_t** bytes, int want_equals) {
  uint32_t n = get_u32(r);
  *bytes = take(r, n);
  if (!*bytes) return 0;
  if (memchr(*bytes, 0, n) || (want_equals && !memchr(*bytes, '=', n))) {
    r->status = CA_E_VALUE;
    return 0;
  }
  return n;
}

int ca_decode_exec(const uint8_t* payload, size_t length, struct ca_exec* exec) {
  memset(exec, 0, sizeof *exec);
  if (length > CA_MAX_PAYLOAD) return CA_E_LENGTH;
  struct reader r = {payload, length, CA_OK};
  uint32_t flags = get_u32(&r);
  uint32_t argc = get_u32(&r);
  uint32_t envc = get_u32(&r);
  if (r.status != CA_OK) return r.status;
  if ((flags & ~CA_EXEC_ENV) || argc == 0 || argc > CA_MAX_ARGS || envc > CA_MAX_ARGS ||
      (!(flags & CA_EXEC_ENV) && envc != 0)) {
    return CA_E_VALUE;
  }
  /* First pass: validate and size. Every string costs at least its 4-byte length in the
   * payload, so the counts are bounded by the payload too. */
  struct reader check = r;
  size_t text = 0;
  for (uint32_t i = 0; i < argc + envc; ++i) {
    const uint8_t* bytes;
    uint32_t n = get_string(&check, &bytes, i >= argc);
    if (check.status != CA_OK) return check.status;
    text += (size_t)n + 1;
  }
  int status = finish(&check);
  if (status != CA_OK) return status;

  size_t pointers = (size_t)argc + 1 + ((flags & CA_EXEC_ENV) ? (size_t)envc + 1 : 0);
  char** block = malloc(pointers * sizeof(char*) + text);
  if (!block) return CA_E_NOMEM;
  char* strings = (char*)(block + pointers);
  exec->argv = block;
  exec->env = (flags & CA_EXEC_ENV) ? block + argc + 1 : NULL;
  exec->has_env = (flags & CA_EXEC_ENV) != 0;
  exec->argc = argc;
  exec->envc = envc;
  for (uint32_t i = 0; i < argc + envc; ++i) {
    const uint8_t* bytes;
    uint32_t n = get_string(&r, &bytes, i >= argc);
    memcpy(strings, bytes, n);
    strings[n] = '\0';
    if (i < argc) exec->argv[i] = strings;
    else exec->env[i - argc] = strings;
    strings += n + 1;
  }
  exec->argv[argc] = NULL;
  if (exec->env) exec->env[envc] = NULL;
  return CA_OK;
}

long ca_encode_exec(uint8_t* out, size_t cap, const char* const* argv, uint32_t argc,
                    const char* const* env, uint32_t envc, int has_env) {
  if (argc == 0 || argc > CA_MAX_ARGS || envc > CA_MAX_ARGS || (!has_env && envc)) return CA_E_VALUE;
  struct writer w = {out, cap, 0, 0};
  put_u32(&w, has_env ? CA_EXEC_ENV : 0);
  put_u32(&w, argc);
  put_u32(&w, envc);
  for (uint32_t i = 0; i < argc + envc; ++i) {
    const char* s = i < argc ? argv[i] : env[i - argc];
    size_t n = strlen(s);
    if (i >= argc && !strchr(s, '=')) return CA_E_VALUE;
    if (n > CA_MAX_PAYLOAD) return CA_E_LENGTH;
    put_u32(&w, (uint32_t)n);
    put(&w, s, n);
  }
  return written(&w);
}

/* ---- EXIT ---- */

void ca_encode_exit(uint8_t out[CA_EXIT_SIZE], const struct ca_exit* e) {
  struct writer w = {out, CA_EXIT_SIZE, 0, 0};
  put_u32(&w, e->kind);
  put_u32(&w, (uint32_t)e->value);
}

int ca_decode_exit(const uint8_t* payload, size_t length, struct ca_exit* e) {
  struct reader r = {payload, length, CA_OK};
  e->kind = get_u32(&r);
  e->value = (int32_t)get_u32(&r);
  int status = finish(&r);
  if (status != CA_OK) return status;
  if (e->kind > 1 || e->value < 0 || (e->kind == 0 && e->value > 255) ||
      (e->kind == 1 && (e->value == 0 || e->value > 127))) {
    return CA_E_VALUE;
  }
  return CA_OK;
}

/* ---- IDENTITY ---- */

static int valid_hostname(const uint8_t* bytes, uint32_t n) {
  if (n == 0 || n > CA_MAX_HOSTNAME) return 0;
  for (uint32_t i = 0; i < n; ++i) {
    uint8_t c = bytes[i];
    /* Letters, digits, '-' and '.' (RFC 1123 names); nothing a shell or file could trip on. */
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
          c == '.')) {
      return 0;
    }
  }
  return 1;
}

int ca_decode_identity(const uint8_t* payload, size_t length, struct ca_identity* id) {
  memset(id, 0, sizeof *id);
  struct reader r = {payload, length, CA_OK};
  id->fields = get_u32(&r);
  uint32_t hostname_length = get_u32(&r);
  if (r.status == CA_OK && hostname_length > CA_MAX_HOSTNAME) return CA_E_VALUE;
  const uint8_t* hostname = take(&r, hostname_length);
  uint32_t seed_length = get_u32(&r);
  if (r.status == CA_OK && seed_length > CA_MAX_SEED) return CA_E_VALUE;
  const uint8_t* seed = take(&r, seed_length);
  id->clock_seconds = (int64_t)get_u64(&r);
  id->clock_nanoseconds = get_u32(&r);
  int status = finish(&r);
  if (status != CA_OK) return status;
  if (id->fields & ~(CA_ID_HOSTNAME | CA_ID_SEED | CA_ID_CLOCK)) return CA_E_VALUE;
  if (id->fields & CA_ID_HOSTNAME) {
    if (!valid_hostname(hostname, hostname_length)) return CA_E_VALUE;
  } else if (hostname_length) {
    return CA_E_VALUE;
  }
  if (id->fields & CA_ID_SEED) {
    if (seed_length == 0) return CA_E_VALUE;
  } else if (seed_length) {
    return CA_E_VALUE;
  }
  if (id->clock_nanoseconds >= 1000000000u || id->clock_seconds < 0 ||
      (!(id->fields & CA_ID_CLOCK) && (id->clock_seconds || id->clock_nanoseconds))) {
    return CA_E_VALUE;
  }
  id->hostname_length = hostname_length;
  if (hostname_length) memcpy(id->hostname, hostname, hostname_length);
  id->hostname[hostname_length] = '\0';
  id->seed_length = seed_length;
  if (seed_length) memcpy(id->seed, seed, seed_length);
  return CA_OK;
}

long ca_encode_identity(uint8_t* out, size_t cap, const struct ca_identity* id) {
  if (id->hostname_length > CA_MAX_HOSTNAME || id->seed_length > CA_MAX_SEED) return CA_E_VALUE;
  struct writer w = {out, cap, 0, 0};
  put_u32(&w, id->fields);
  put_u32(&w, id->hostname_length);
  put(&w, id->hostname, id->hostname_length);
  put_u32(&w, id->seed_length);
  put(&w, id->seed, id->seed_length);
  put_u64(&w, (uint64_t)id->clock_seconds);
  put_u32(&w, id->clock_nanoseconds);
  return written(&w);
}

long ca_encode_identity_result(uint8_t* out, size_t cap, const struct ca_identity_result* res) {
  if (res->hostname_length > CA_MAX_HOSTNAME) return CA_E_VALUE;
  struct writer w = {out, cap, 0, 0};
  put_u32(&w, res->applied);
  put_u32(&w, (uint32_t)res->hostname_error);
  put_u32(&w, (uint32_t)res->seed_error);
  put_u32(&w, (uint32_t)res->reseed_error);
  put_u32(&w, (uint32_t)res->clock_error);
  put_u32(&w, (uint32_t)res->entropy_avail);
  put_u32(&w, (uint32_t)res->crng_ready);
  put_u64(&w, (uint64_t)res->clock_seconds);
  put_u32(&w, res->clock_nanoseconds);
  put_u32(&w, res->hostname_length);
  put(&w, res->hostname, res->hostname_length);
  return written(&w);
}

int ca_decode_identity_result(const uint8_t* payload, size_t length, struct ca_identity_result* res) {
  memset(res, 0, sizeof *res);
  struct reader r = {payload, length, CA_OK};
  res->applied = get_u32(&r);
  res->hostname_error = (int32_t)get_u32(&r);
  res->seed_error = (int32_t)get_u32(&r);
  res->reseed_error = (int32_t)get_u32(&r);
  res->clock_error = (int32_t)get_u32(&r);
  res->entropy_avail = (int32_t)get_u32(&r);
  res->crng_ready = (int32_t)get_u32(&r);
  res->clock_seconds = (int64_t)get_u64(&r);
  res->clock_nanoseconds = get_u32(&r);
  uint32_t n = get_u32(&r);
  if (r.status == CA_OK && n > CA_MAX_HOSTNAME) return CA_E_VALUE;
  const uint8_t* hostname = take(&r, n);
  int status = finish(&r);
  if (status != CA_OK) return status;
  if (res->applied & ~(CA_ID_HOSTNAME | CA_ID_SEED | CA_ID_CLOCK)) return CA_E_VALUE;
  if (memchr(hostname, 0, n) || res->clock_nanoseconds >= 1000000000u) return CA_E_VALUE;
  res->hostname_length = n;
  if (n) memcpy(res->hostname, hostname, n);
  res->hostname[n] = '\0';
  return CA_OK;
}

/* ---- ERROR ---- */

long ca_encode_error(uint8_t* out, size_t cap, int32_t error, const char* text) {
  size_t n = strlen(text);
  if (n > CA_MAX_ERROR_TEXT) n = CA_MAX_ERROR_TEXT;
  struct writer w = {out, cap, 0, 0};
  put_u32(&w, (uint32_t)error);
  put(&w, text, n);
  return written(&w);
}

int ca_decode_error(const uint8_t* payload, size_t length, int32_t* error, char* text) {
  struct reader r = {payload, length, CA_OK};
  *error = (int32_t)get_u32(&r);
  if (r.status != CA_OK) return r.status;
  if (r.left > CA_MAX_ERROR_TEXT) return CA_E_LENGTH;
  size_t n = r.left;
  const uint8_t* bytes = take(&r, n);
  if (n && memchr(bytes, 0, n)) return CA_E_VALUE;
  if (n) memcpy(text, bytes, n);
  text[n] = '\0';
  return CA_OK;
}
