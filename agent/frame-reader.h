/*
 * Reading the daemon's requests, shared by the agent and the spawner. Frames are
 * `u32 LE length-of-rest | u8 type | u32 LE id | payload`; partial frames wait for the rest.
 */
#ifndef POSEIDON_FRAME_READER_H
#define POSEIDON_FRAME_READER_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { FRAMES_OK = 0, FRAMES_EOF = 1, FRAMES_BAD = 2, FRAMES_NO_MEMORY = 3 };

struct frame_reader {
	uint8_t *buf;
	size_t len, cap;
	size_t chunk;     /* one read; the buffer is given back down to 4 chunks when idle */
	uint32_t max_frame;
	uint32_t bad_length; /* set with FRAMES_BAD */
};

typedef void (*frame_handler)(uint8_t type, uint32_t id, const uint8_t *payload, size_t len);

static inline uint32_t frame_u32(const uint8_t *p)
{
	return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* One read from fd, then every complete frame to handle(). */
static int frame_reader_read(struct frame_reader *r, int fd, frame_handler handle)
{
	if (r->cap - r->len < r->chunk) {
		size_t cap = r->cap ? r->cap * 2 : 4 * r->chunk;
		uint8_t *p = realloc(r->buf, cap);
		if (!p) return FRAMES_NO_MEMORY;
		r->buf = p;
		r->cap = cap;
	}
	ssize_t n = read(fd, r->buf + r->len, r->cap - r->len);
	if (n < 0 && (errno == EINTR || errno == EAGAIN)) return FRAMES_OK;
	if (n <= 0) return FRAMES_EOF;
	r->len += (size_t)n;
	size_t off = 0;
	while (r->len - off >= 4) {
		const uint8_t *f = r->buf + off;
		uint32_t rest = frame_u32(f);
		if (rest < 5 || rest > r->max_frame) {
			r->bad_length = rest;
			return FRAMES_BAD;
		}
		if (r->len - off - 4 < rest) {
			/* Make room for the whole frame at once instead of doubling on every read. */
			if (4 + (size_t)rest > r->cap) {
				memmove(r->buf, f, r->len - off);
				r->len -= off;
				off = 0;
				uint8_t *p = realloc(r->buf, 4 + (size_t)rest + r->chunk);
				if (!p) return FRAMES_NO_MEMORY;
				r->buf = p;
				r->cap = 4 + (size_t)rest + r->chunk;
			}
			break;
		}
		handle(f[4], frame_u32(f + 5), f + 9, rest - 5);
		off += 4 + (size_t)rest;
	}
	memmove(r->buf, r->buf + off, r->len - off);
	r->len -= off;
	/* The agent's memory counts against its runner's cgroup: give back what a big request needed. */
	if (r->cap > 16 * r->chunk && r->len < r->chunk) {
		uint8_t *p = realloc(r->buf, 4 * r->chunk);
		if (p) {
			r->buf = p;
			r->cap = 4 * r->chunk;
		}
	}
	return FRAMES_OK;
}

#endif
