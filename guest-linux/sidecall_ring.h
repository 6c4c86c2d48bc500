/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The guest's side of the sidecall slot protocol, shared by sidecore.ko and
 * its userspace test (tests/ring-test.c), which runs it against a model
 * sidecore thread in every interleaving it can provoke.
 *
 * It follows shm-proto/src/ring.rs (layout and slot states),
 * shm-proto/src/sidecall.rs (posting, withdrawal, resynchronisation) and
 * guest-agent/src/client.rs (bounds, back-off, counters) rule for rule:
 *
 *   post:     try_post into the slot of the client's ticket: a CLAIMED slot
 *             is busy; a POSTED or CANCELLED one is first taken by
 *             compare-and-swap; a finished word of this very ticket means the
 *             sidecore is past it; of a foreign lap, resync to consumer.
 *   wait:     for DONE within the reply bound.
 *   withdraw: CAS (t, POSTED) -> (t, CANCELLED); only if it succeeds does the
 *             caller take the exit path (at most once). If it fails the
 *             sidecore claimed the call: wait for its reply while the ring's
 *             heartbeat moves.
 *
 * One client per CPU, used with interrupts off: nothing here is reentrant.
 *
 * Environment: in the kernel, the usual primitives. Elsewhere the includer
 * first defines u8..u64, s64, READ_ONCE, WRITE_ONCE, smp_load_acquire,
 * smp_store_release, cmpxchg, try_cmpxchg, cpu_relax, static_assert,
 * __aligned, and sc_env_now() (a TSC) and sc_env_doorbell().
 */
#ifndef SIDECALL_RING_H
#define SIDECALL_RING_H

#ifdef __KERNEL__
#include <linux/build_bug.h>
#include <linux/compiler.h>
#include <linux/stddef.h>
#include <linux/string.h>
#include <linux/types.h>
#include <asm/barrier.h>
#include <asm/io.h>
#include <asm/msr.h>
#include <asm/processor.h>

#define SC_PORT_DOORBELL	0x3f7

static inline u64 sc_env_now(void)
{
	return rdtsc();
}

static inline void sc_env_doorbell(void)
{
	outl(0, SC_PORT_DOORBELL);
}
#endif

#include "sidecall_uapi.h"

#ifndef SIDECORE_WORDS
#define SIDECORE_WORDS 6
#endif

/* ---- The shared region's layout (shm-proto/src/ring.rs) ---- */

#define SC_REGION_MAGIC		0x45524f4345444953ULL	/* "SIDECORE" */
#define SC_ABI_VERSION		2
#define SC_RING_SLOTS		64
#define SC_SLOT_SIZE		64
#define SC_VCPU_OFFSET		4096
#define SC_VCPU_STRIDE		8192
#define SC_HEADER_SIZE		4096

#define SC_TICKET_BITS		60
#define SC_TICKET_MASK		((1ULL << SC_TICKET_BITS) - 1)

enum sc_slot_state {
	SC_EMPTY = 0,
	SC_POSTED = 1,
	SC_CLAIMED = 2,
	SC_DONE = 3,
	SC_CANCELLED = 4,
	SC_SKIPPED = 5,
};

struct sc_slot {
	u64 state;		/* ticket << 4 | state */
	u64 head;		/* request head, or reply status */
	u64 words[SIDECORE_WORDS];
} __aligned(64);

/* One counter on a 128-byte line of its own. */
struct sc_line {
	u64 value;
	u64 pad[15];
};

/* Written by the guest only; the order is the agent's. */
struct sc_guest_counters {
	u64 sidecalls;
	u64 fallbacks;
	u64 late_replies;
	u64 probes;
	u64 paused_exits;
	u64 abandoned;
	u64 pad[10];
};

/* Written by the host only. */
struct sc_host_status {
	u64 pte_status;
	u64 pte_kind;
	u64 sidecore_lost;
	u64 paused;
	u64 beat;
	u64 pad[11];
};

struct sc_vcpu {
	struct sc_slot slots[SC_RING_SLOTS];
	struct sc_line consumer;	/* host: the ticket it expects next */
	struct sc_line producer;	/* guest: its next ticket (information) */
	struct sc_slot exit_slot;	/* the PIO mailbox */
	u64 pad_exit[8];
	struct sc_guest_counters guest;
	u8 console[256];
	struct sc_host_status host;
	u8 rest[SC_VCPU_STRIDE - 4992];	/* latency, events, packets: unused */
};

struct sc_header {
	u64 magic;
	u32 abi_version;
	u32 nr_vcpus;
	u64 features;
	u32 ring_slots;
	u32 slot_size;
	u64 vcpu_offset;
	u64 vcpu_stride;
	u64 pad[10];
	struct sc_line heartbeat;
	struct sc_line parked;
	u8 rest[SC_HEADER_SIZE - 384];
};

static_assert(sizeof(struct sc_slot) == SC_SLOT_SIZE);
static_assert(sizeof(struct sc_line) == 128);
static_assert(sizeof(struct sc_guest_counters) == 128);
static_assert(sizeof(struct sc_host_status) == 128);
static_assert(sizeof(struct sc_vcpu) == SC_VCPU_STRIDE);
static_assert(offsetof(struct sc_vcpu, consumer) == 4096);
static_assert(offsetof(struct sc_vcpu, producer) == 4224);
static_assert(offsetof(struct sc_vcpu, exit_slot) == 4352);
static_assert(offsetof(struct sc_vcpu, guest) == 4480);
static_assert(offsetof(struct sc_vcpu, console) == 4608);
static_assert(offsetof(struct sc_vcpu, host) == 4864);
static_assert(offsetof(struct sc_vcpu, host.sidecore_lost) == 4880);
static_assert(offsetof(struct sc_vcpu, host.beat) == 4896);
static_assert(sizeof(struct sc_header) == SC_HEADER_SIZE);
static_assert(offsetof(struct sc_header, nr_vcpus) == 12);
static_assert(offsetof(struct sc_header, ring_slots) == 24);
static_assert(offsetof(struct sc_header, vcpu_offset) == 32);
static_assert(offsetof(struct sc_header, vcpu_stride) == 40);
static_assert(offsetof(struct sc_header, heartbeat) == 128);
static_assert(offsetof(struct sc_header, parked) == 256);

/* ---- The client's state ---- */

/* What a client needs to know of its region: the same for every CPU. */
struct sc_ring_ctx {
	struct sc_header *hdr;
	u64 bound;		/* reply bound of a sidecall, TSC cycles */
	u64 backoff;		/* absent this long before probing again */
	u64 liveness;		/* claimed call: heartbeat may stand this long */
	u64 claim_limit;	/* claimed call: never wait longer than this */
};

/* Where a CPU is in its ring, and whether it backs off (client.rs). */
struct sc_client {
	struct sc_vcpu *vs;	/* NULL: no vCPU block for this CPU */
	const struct sc_ring_ctx *ctx;
	bool from_consumer;	/* ticket came from consumer: trusted */
	bool absent;		/* a sidecall fell back: back off */
	u64 ticket;		/* the ticket the next call tries first */
	u64 absent_since;	/* TSC when marked absent */
	u64 beat_at_absent;	/* host.beat then */
	u64 lost;		/* claimed calls nobody answered */
};

/* A reply as the caller sees it. */
struct sc_reply {
	u32 status;
	bool by_sidecall;
	u64 words[SIDECORE_WORDS];
};

/* ---- Tickets and slots (ring.rs) ---- */

static inline u64 sc_state_word(u64 ticket, enum sc_slot_state st)
{
	return ((ticket & SC_TICKET_MASK) << 4) | st;
}

static inline unsigned int sc_slot_index(u64 ticket)
{
	return ticket & (SC_RING_SLOTS - 1);
}

static inline u64 sc_next_ticket(u64 t)
{
	return (t + 1) & SC_TICKET_MASK;
}

/* Wrap-aware distance from @expected to @t: negative for an older ticket. */
static inline s64 sc_ticket_distance(u64 expected, u64 t)
{
	return (s64)((t - expected) << 4) >> 4;
}

static inline u64 sc_head(u16 op)
{
	return op;	/* no flags, reserved bits zero */
}

/* Bumps a counter only this CPU writes: no locked instruction. */
static inline void sc_bump(u64 *c)
{
	WRITE_ONCE(*c, READ_ONCE(*c) + 1);
}

static inline void sc_write_body(struct sc_slot *s, u64 head, const u64 *w)
{
	int i;

	WRITE_ONCE(s->head, head);
	for (i = 0; i < SIDECORE_WORDS; i++)
		WRITE_ONCE(s->words[i], w[i]);
}

/* Reads a reply once; the caller ordered it after the state word. */
static inline void sc_read_reply(struct sc_slot *s, struct sc_reply *r)
{
	u64 head = READ_ONCE(s->head);
	int i;

	for (i = 0; i < SIDECORE_WORDS; i++)
		r->words[i] = READ_ONCE(s->words[i]);
	/* A status shm-proto does not define is the host's error. */
	r->status = (head > SIDECALL_ST_HOST_ERROR) ? SIDECALL_ST_HOST_ERROR
						    : (u32)head;
}

enum sc_try_post { SC_TP_POSTED, SC_TP_BUSY, SC_TP_PASSED, SC_TP_FOREIGN };

/*
 * The sidecore changes a POSTED or CANCELLED word once (to CLAIMED or
 * SKIPPED), so the swap below fails at most a few times; past this many
 * the slot is taken as busy.
 */
#define SC_CAS_TRIES 8

/* Slot::try_post: publishes ticket @t if the guest owns the slot. */
static inline enum sc_try_post sc_try_post(struct sc_slot *s, u64 t,
					   u64 head, const u64 *w,
					   bool trusted)
{
	/* Acquire: a finished word's reply is read after it (ring.rs). */
	u64 cur = smp_load_acquire(&s->state);
	int tries = 0;

	for (;;) {
		u64 x = cur >> 4;
		unsigned int st = cur & 0xf;

		if (st == SC_CLAIMED)
			return SC_TP_BUSY;
		if ((st == SC_SKIPPED || st == SC_DONE) &&
		    sc_slot_index(x) == sc_slot_index(t)) {
			s64 d = sc_ticket_distance(t, x);

			/* The sidecore finished with this very ticket. */
			if (d == 0)
				return SC_TP_PASSED;
			if (d != -SC_RING_SLOTS && !trusted)
				return SC_TP_FOREIGN;
			break;
		}
		if (st == SC_POSTED || st == SC_CANCELLED) {
			/* The sidecore may claim or skip it: take it first. */
			if (++tries > SC_CAS_TRIES)
				return SC_TP_BUSY;
			if (try_cmpxchg(&s->state, &cur,
					sc_state_word(t, SC_EMPTY)))
				break;
			continue;
		}
		/* Any other word is the guest's. */
		break;
	}
	sc_write_body(s, head, w);
	/* Release: the sidecore's acquire of POSTED sees the body. */
	smp_store_release(&s->state, sc_state_word(t, SC_POSTED));
	return SC_TP_POSTED;
}

/* Slot::try_cancel: true when the guest withdrew @t and owns the call. */
static inline bool sc_try_cancel(struct sc_slot *s, u64 t)
{
	u64 posted = sc_state_word(t, SC_POSTED);

	return cmpxchg(&s->state, posted, sc_state_word(t, SC_CANCELLED)) ==
	       posted;
}

enum sc_poll { SC_POLL_DONE, SC_POLL_PENDING, SC_POLL_CLAIMED, SC_POLL_GONE };

static inline enum sc_poll sc_poll(struct sc_vcpu *vs, u64 t, struct sc_reply *r)
{
	struct sc_slot *s = &vs->slots[sc_slot_index(t)];
	/* Acquire: pairs with the sidecore's release of DONE. */
	u64 w = smp_load_acquire(&s->state);

	if (w == sc_state_word(t, SC_DONE)) {
		sc_read_reply(s, r);
		return SC_POLL_DONE;
	}
	if (w == sc_state_word(t, SC_POSTED))
		return SC_POLL_PENDING;
	if (w == sc_state_word(t, SC_CLAIMED))
		return SC_POLL_CLAIMED;
	return SC_POLL_GONE;
}

/* ---- The guest's ring position (sidecall.rs GuestRing) ---- */

static inline u64 sc_consumer(struct sc_vcpu *vs)
{
	/* Acquire, as sidecall.rs reads it: the host's position. */
	return smp_load_acquire(&vs->consumer.value) & SC_TICKET_MASK;
}

static inline void sc_resync(struct sc_client *c)
{
	c->ticket = sc_consumer(c->vs);
	c->from_consumer = true;
}

/* Posts at @t, past tickets the sidecore finished, or where it says it is. */
static inline bool sc_post_from(struct sc_client *c, u64 t, bool trusted,
				u64 head, const u64 *w, u64 *posted)
{
	int i;

	for (i = 0; i <= SC_RING_SLOTS; i++) {
		switch (sc_try_post(&c->vs->slots[sc_slot_index(t)], t, head, w,
				    trusted)) {
		case SC_TP_POSTED:
			c->ticket = sc_next_ticket(t);
			c->from_consumer = false;
			*posted = t;
			return true;
		case SC_TP_PASSED:
			t = sc_next_ticket(t);
			break;
		case SC_TP_FOREIGN:
			t = sc_consumer(c->vs);
			trusted = true;
			break;
		case SC_TP_BUSY:
			return false;
		}
	}
	return false;
}

/* GuestRing::post: false when the slots are busy and nothing was posted. */
static inline bool sc_post(struct sc_client *c, u64 head, const u64 *w, u64 *posted)
{
	if (sc_post_from(c, c->ticket, c->from_consumer, head, w, posted))
		return true;
	if (!c->from_consumer &&
	    sc_post_from(c, sc_consumer(c->vs), true, head, w, posted))
		return true;
	sc_resync(c);
	return false;
}

/* ---- The client (client.rs) ---- */

static inline void sc_mark_absent(struct sc_client *c)
{
	c->absent = true;
	c->absent_since = sc_env_now();
	c->beat_at_absent = READ_ONCE(c->vs->host.beat);
}

static inline bool sc_sidecore_usable(struct sc_client *c)
{
	struct sc_host_status *host = &c->vs->host;
	u64 beat;

	/* A sidecore the VMM knows is gone for good is not probed again. */
	if (READ_ONCE(host->sidecore_lost))
		return false;
	/* Nor is a paused ring: straight to the exit path. */
	if (READ_ONCE(host->paused)) {
		sc_bump(&c->vs->guest.paused_exits);
		return false;
	}
	if (!c->absent)
		return true;
	beat = READ_ONCE(host->beat);
	if (beat != c->beat_at_absent ||
	    sc_env_now() - c->absent_since > c->ctx->backoff) {
		c->absent = false;
		sc_bump(&c->vs->guest.probes);
	}
	return !c->absent;
}

static inline bool sc_replied(struct sc_client *c, struct sc_reply *r)
{
	sc_bump(&c->vs->guest.sidecalls);
	r->by_sidecall = true;
	/* The sidecore followed a lap the guest should not have used. */
	if (r->status == SIDECALL_ST_BAD_SEQUENCE)
		sc_resync(c);
	return true;
}

/*
 * A claimed call nobody will answer: whether it was carried out is
 * unknown. NULL and CPUID change nothing and go to the exit path (false);
 * any other call is answered with the host's error.
 */
static inline bool sc_lost_call(struct sc_client *c, u16 op, struct sc_reply *r)
{
	sc_resync(c);
	sc_mark_absent(c);
	c->lost++;
	if (op == SIDECALL_OP_NULL || op == SIDECALL_OP_CPUID)
		return false;
	r->status = SIDECALL_ST_HOST_ERROR;
	r->by_sidecall = true;
	memset(r->words, 0, sizeof(r->words));
	return true;
}

/*
 * Waits for a call the sidecore claimed: until the reply comes, the VMM
 * says the sidecore is gone, or the ring's heartbeat stands still for the
 * liveness bound. A heartbeat that moves while the reply never comes is cut
 * off at claim_limit, so that the guest cannot hang with interrupts off.
 */
static inline bool sc_wait_claimed(struct sc_client *c, u64 t, u16 op,
				   struct sc_reply *r)
{
	struct sc_vcpu *vs = c->vs;
	u64 beat = READ_ONCE(vs->host.beat);
	u64 since = sc_env_now();
	u64 begin = since;

	for (;;) {
		u64 now, b;

		switch (sc_poll(vs, t, r)) {
		case SC_POLL_DONE:
			return sc_replied(c, r);
		case SC_POLL_CLAIMED:
			break;
		case SC_POLL_PENDING:
			/* Posted again: if withdrawn, it never ran. */
			if (sc_try_cancel(&vs->slots[sc_slot_index(t)], t)) {
				sc_resync(c);
				return false;
			}
			return sc_lost_call(c, op, r);
		case SC_POLL_GONE:
			return sc_lost_call(c, op, r);
		}
		/* Acquire, as client.rs: the VMM's verdict, then the slot. */
		if (smp_load_acquire(&vs->host.sidecore_lost))
			return sc_lost_call(c, op, r);
		now = sc_env_now();
		b = READ_ONCE(vs->host.beat);
		if (b != beat) {
			beat = b;
			since = now;
		} else if (now - since > c->ctx->liveness) {
			sc_bump(&vs->guest.abandoned);
			return sc_lost_call(c, op, r);
		}
		if (now - begin > c->ctx->claim_limit) {
			sc_bump(&vs->guest.abandoned);
			return sc_lost_call(c, op, r);
		}
		cpu_relax();
	}
}

/*
 * Wakes a parked sidecore: PORT_DOORBELL is an in-kernel eventfd, no trip
 * to the VMM. No fence: a sidecore that parks just as the guest posts wakes
 * by itself within its nap, well inside the bound.
 */
static inline void sc_doorbell_if_parked(struct sc_client *c)
{
	if (READ_ONCE(c->ctx->hdr->parked.value))
		sc_env_doorbell();
}

/*
 * One sidecall. False when the sidecore did not carry it out: the slots
 * were busy, the call was withdrawn after its bound, or a NULL or CPUID
 * call it had claimed was lost. The caller then takes the exit path.
 */
static inline bool sc_sidecall(struct sc_client *c, u16 op, const u64 *w,
			       struct sc_reply *r)
{
	struct sc_vcpu *vs = c->vs;
	u64 t, start;

	if (!sc_post(c, sc_head(op), w, &t)) {
		/* Both slots busy: the sidecore holds an unanswered call. */
		sc_bump(&vs->guest.fallbacks);
		sc_mark_absent(c);
		return false;
	}
	WRITE_ONCE(vs->producer.value, c->ticket);
	sc_doorbell_if_parked(c);
	start = sc_env_now();
	/* No pause in this loop: PAUSE exits (pause filter) would cost more. */
	do {
		if (sc_poll(vs, t, r) == SC_POLL_DONE)
			return sc_replied(c, r);
	} while (sc_env_now() - start <= c->ctx->bound);

	if (sc_try_cancel(&vs->slots[sc_slot_index(t)], t)) {
		sc_resync(c);
		sc_bump(&vs->guest.fallbacks);
		sc_mark_absent(c);
		return false;
	}
	switch (sc_poll(vs, t, r)) {
	case SC_POLL_DONE:
		return sc_replied(c, r);
	case SC_POLL_CLAIMED:
		/* Claimed before the withdrawal: it will be answered. */
		sc_bump(&vs->guest.late_replies);
		return sc_wait_claimed(c, t, op, r);
	default:
		return sc_lost_call(c, op, r);
	}
}

/*
 * GuestRing::resume: starts wherever the sidecore is. @c->vs is stored
 * last, with release: whoever sees it (sc_this_cpu) sees the rest.
 */
static inline void sc_client_resume(struct sc_client *c, struct sc_vcpu *vs,
				    const struct sc_ring_ctx *ctx)
{
	c->ctx = ctx;
	c->absent = false;
	c->ticket = sc_consumer(vs);
	c->from_consumer = true;
	/* Release: pairs with the acquire of vs before a call. */
	smp_store_release(&c->vs, vs);
}

/*
 * Client::call's first half: true when the sidecore carried the call out
 * and *@r is its reply. False: the caller takes the exit path, which it may
 * (the call was never posted, was withdrawn, or was refused unexecuted).
 */
static inline bool sc_try_sidecall(struct sc_client *c, u16 op, const u64 *w,
				   struct sc_reply *r)
{
	if (!sc_sidecore_usable(c))
		return false;
	/* Neither a refusal to serve nor a refused sequence was carried out. */
	return sc_sidecall(c, op, w, r) &&
	       r->status != SIDECALL_ST_USE_EXIT_PATH &&
	       r->status != SIDECALL_ST_BAD_SEQUENCE;
}

#endif /* SIDECALL_RING_H */
