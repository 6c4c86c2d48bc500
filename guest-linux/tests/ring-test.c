// SPDX-License-Identifier: GPL-2.0
/*
 * ring-test: the guest side of the slot protocol exactly as sidecore.ko
 * runs it (sidecall_ring.h), in userspace, against a model sidecore thread
 * that follows sidecore/src/ring.rs (serve_slot, advance, heartbeat).
 *
 * Each scenario makes thousands of calls while the model misbehaves in the
 * ways the protocol allows (slow claims, slow replies, pauses, a hang, a
 * sidecore that goes away) and the guest scribbles on its own ring. Every
 * HC_COUNTER_ADD call carries an id; the model and the exit path record
 * each execution. The test fails unless every call was carried out exactly
 * once (at most once for a call reported lost), every reply carries the
 * counter value the guest expects, and the client's counters say what
 * happened.
 *
 * Build and run: make -C guest-linux test
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t s64;

#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile __typeof__(x) *)&(x) = (v))
#define smp_load_acquire(p) __atomic_load_n(p, __ATOMIC_ACQUIRE)
#define smp_store_release(p, v) __atomic_store_n(p, v, __ATOMIC_RELEASE)
#define try_cmpxchg(p, po, n) \
	__atomic_compare_exchange_n(p, po, n, false, __ATOMIC_SEQ_CST, \
				    __ATOMIC_SEQ_CST)
#define cmpxchg(p, o, n) ({						\
	__typeof__(*(p)) __old = (o);					\
	__atomic_compare_exchange_n(p, &__old, n, false,		\
				    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
	__old;								\
})
#define cpu_relax() __builtin_ia32_pause()
#define __aligned(x) __attribute__((aligned(x)))
#define static_assert(e) _Static_assert(e, #e)

/* The "TSC": monotonic nanoseconds. */
static u64 sc_env_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (u64)ts.tv_sec * 1000000000ull + (u64)ts.tv_nsec;
}

static u64 doorbells;

static void sc_env_doorbell(void)
{
	__atomic_add_fetch(&doorbells, 1, __ATOMIC_RELAXED);
}

#include "../sidecall_ring.h"

/*
 * Bounds in ns, the guest's own ratios (back-off 10 bounds, claim limit 10
 * liveness bounds) at a smaller scale so that scenarios run in seconds. A
 * loaded machine deschedules the model for milliseconds: that makes calls
 * fall back, never makes the test fail.
 */
#define BOUND		(5 * 1000 * 1000ull)
#define BACKOFF		(2 * BOUND)	/* the guest's is 10: more probes here */
#define LIVENESS	(50 * BOUND)
#define CLAIM_LIMIT	(10 * LIVENESS)
#define BEAT_EVERY	(20 * 1000ull)
/* What an exit costs, roughly: the exit path must not be free here. */
#define EXIT_COST	(10 * 1000ull)
/* A pausing model serves this long between pauses of up to 2 bounds. */
#define RUN_BETWEEN_PAUSES (6 * BOUND)

#define MAX_CALLS 40000

static int failures;

static __attribute__((format(printf, 1, 2))) void fail(const char *fmt, ...)
{
	va_list ap;

	failures++;
	fputs("FAIL: ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
}

/* ---- The model sidecore (sidecore/src/ring.rs) ---- */

struct model {
	struct sc_header *hdr;
	struct sc_vcpu *vs;
	u64 next;			/* the ticket it expects */
	u64 counter;			/* HC_COUNTER_ADD's value */
	u8 executed[MAX_CALLS];		/* executions per call id */
	/* Knobs, set per scenario. */
	unsigned int slow_claim_pct;	/* claim after more than the bound */
	unsigned int slow_reply_pct;	/* reply after more than the bound */
	bool pauses_now_and_then;	/* pause every RUN_BETWEEN_PAUSES */
	bool hang_once;			/* claim one call, never answer */
	/* Control. */
	int stop;			/* 1: the thread ends */
	int hung;			/* set once the hang happened */
	u64 rng;
	u64 served, skipped, bad_sequence, released, lost_claims, pauses;
};

static u64 rnd(u64 *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void spin_for(u64 ns)
{
	u64 t = sc_env_now();

	while (sc_env_now() - t < ns)
		cpu_relax();
}

/* The services both paths use: what the VMM's handlers do. */
static u32 dispatch(struct model *m, u64 head, const u64 *w, u64 *out)
{
	memset(out, 0, SIDECORE_WORDS * sizeof(u64));
	switch (head) {
	case SIDECALL_OP_NULL:
		out[0] = w[0];
		return SIDECALL_ST_OK;
	case SIDECALL_HC_COUNTER_ADD:
		if (w[1] >= MAX_CALLS)
			return SIDECALL_ST_BAD_ARGUMENT;
		__atomic_add_fetch(&m->executed[w[1]], 1, __ATOMIC_SEQ_CST);
		out[0] = __atomic_add_fetch(&m->counter, w[0], __ATOMIC_SEQ_CST);
		return SIDECALL_ST_OK;
	default:
		return SIDECALL_ST_UNKNOWN_OP;
	}
}

static void model_advance(struct model *m)
{
	m->next = sc_next_ticket(m->next);
	__atomic_store_n(&m->vs->consumer.value, m->next, __ATOMIC_RELEASE);
}

static void model_reply(struct sc_slot *slot, u64 t, u32 status, const u64 *w)
{
	int i;

	__atomic_store_n(&slot->head, status, __ATOMIC_RELAXED);
	for (i = 0; i < SIDECORE_WORDS; i++)
		__atomic_store_n(&slot->words[i], w[i], __ATOMIC_RELAXED);
	__atomic_store_n(&slot->state, sc_state_word(t, SC_DONE),
			 __ATOMIC_RELEASE);
}

/* RingRef::serve_slot. */
static bool model_serve_slot(struct model *m)
{
	struct sc_slot *slot = &m->vs->slots[sc_slot_index(m->next)];
	u64 seen = __atomic_load_n(&slot->state, __ATOMIC_ACQUIRE);
	u64 ticket = seen >> 4, head, w[SIDECORE_WORDS], out[SIDECORE_WORDS];
	u64 want;
	int i;

	switch (seen & 0xf) {
	case SC_POSTED:
		if (rnd(&m->rng) % 100 < m->slow_claim_pct)
			spin_for(BOUND + rnd(&m->rng) % (2 * BOUND));
		want = (seen & ~0xfull) | SC_CLAIMED;
		if (!__atomic_compare_exchange_n(&slot->state, &seen, want, false,
						 __ATOMIC_ACQ_REL,
						 __ATOMIC_RELAXED)) {
			m->lost_claims++;
			return false;
		}
		head = __atomic_load_n(&slot->head, __ATOMIC_RELAXED);
		for (i = 0; i < SIDECORE_WORDS; i++)
			w[i] = __atomic_load_n(&slot->words[i], __ATOMIC_RELAXED);
		if (ticket != m->next) {
			memset(out, 0, sizeof(out));
			m->bad_sequence++;
			model_reply(slot, ticket, SIDECALL_ST_BAD_SEQUENCE, out);
			if (sc_slot_index(ticket) == sc_slot_index(m->next) &&
			    sc_ticket_distance(m->next, ticket) > 0) {
				m->next = ticket;
				model_advance(m);
			}
			return true;
		}
		if (m->hang_once && !m->hung && head == SIDECALL_HC_COUNTER_ADD) {
			/* Claimed, never answered, no heartbeat: a hung sidecore. */
			__atomic_store_n(&m->hung, 1, __ATOMIC_RELEASE);
			while (!__atomic_load_n(&m->stop, __ATOMIC_ACQUIRE))
				spin_for(1000000);
			return false;
		}
		if (rnd(&m->rng) % 100 < m->slow_reply_pct)
			spin_for(BOUND + rnd(&m->rng) % (3 * BOUND));
		model_reply(slot, ticket, dispatch(m, head, w, out), out);
		m->served++;
		model_advance(m);
		return true;
	case SC_CANCELLED:
		if (ticket != m->next)
			return false;
		want = sc_state_word(ticket, SC_SKIPPED);
		if (!__atomic_compare_exchange_n(&slot->state, &seen, want, false,
						 __ATOMIC_ACQ_REL,
						 __ATOMIC_RELAXED))
			return false;
		m->skipped++;
		model_advance(m);
		return true;
	case SC_DONE:
	case SC_SKIPPED:
		if (ticket != m->next)
			return false;
		m->bad_sequence++;
		model_advance(m);
		return true;
	case SC_CLAIMED:
		want = sc_state_word(ticket, SC_CANCELLED);
		if (__atomic_compare_exchange_n(&slot->state, &seen, want, false,
						__ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
			m->released++;
		return false;
	default:
		return false;
	}
}

static void model_heartbeat(struct model *m)
{
	__atomic_add_fetch(&m->hdr->heartbeat.value, 1, __ATOMIC_RELAXED);
	__atomic_add_fetch(&m->vs->host.beat, 1, __ATOMIC_RELAXED);
	if (__atomic_load_n(&m->vs->consumer.value, __ATOMIC_RELAXED) != m->next)
		__atomic_store_n(&m->vs->consumer.value, m->next,
				 __ATOMIC_RELEASE);
}

static void *model_thread(void *arg)
{
	struct model *m = arg;
	u64 last_beat = 0, pause_at = sc_env_now() + RUN_BETWEEN_PAUSES;

	while (!__atomic_load_n(&m->stop, __ATOMIC_ACQUIRE)) {
		u64 now = sc_env_now();
		int n;

		if (m->pauses_now_and_then && now > pause_at) {
			/* Paused: says so, serves nothing, does not beat. */
			m->pauses++;
			__atomic_store_n(&m->vs->host.paused, 1, __ATOMIC_RELEASE);
			spin_for(rnd(&m->rng) % (2 * BOUND));
			__atomic_store_n(&m->vs->host.paused, 0, __ATOMIC_RELEASE);
			pause_at = sc_env_now() + RUN_BETWEEN_PAUSES;
		}
		for (n = 0; n < 8 && model_serve_slot(m); n++)
			;
		if (__atomic_load_n(&m->hung, __ATOMIC_ACQUIRE))
			break;
		now = sc_env_now();
		if (now - last_beat > BEAT_EVERY) {
			model_heartbeat(m);
			last_beat = now;
		}
		cpu_relax();
	}
	return NULL;
}

/* ---- The guest ---- */

struct world {
	struct sc_header *hdr;
	struct sc_vcpu *vs;
	struct sc_ring_ctx ctx;
	struct sc_client c;
	struct model m;
	pthread_t thread;
	bool running;
};

static struct world *world_new(void)
{
	struct world *w = calloc(1, sizeof(*w));
	void *region = aligned_alloc(4096, SC_VCPU_OFFSET + SC_VCPU_STRIDE);

	if (!w || !region) {
		perror("ring-test: alloc");
		exit(2);
	}
	memset(region, 0, SC_VCPU_OFFSET + SC_VCPU_STRIDE);
	w->hdr = region;
	w->vs = (struct sc_vcpu *)((char *)region + SC_VCPU_OFFSET);
	w->ctx = (struct sc_ring_ctx){ .hdr = w->hdr, .bound = BOUND,
		.backoff = BACKOFF, .liveness = LIVENESS,
		.claim_limit = CLAIM_LIMIT };
	w->m.hdr = w->hdr;
	w->m.vs = w->vs;
	w->m.rng = 0x9e3779b97f4a7c15ull;
	sc_client_resume(&w->c, w->vs, &w->ctx);
	return w;
}

static void world_start(struct world *w)
{
	if (pthread_create(&w->thread, NULL, model_thread, &w->m)) {
		perror("ring-test: pthread_create");
		exit(2);
	}
	w->running = true;
	/* Serving before the first call: wait for its first heartbeat. */
	while (!__atomic_load_n(&w->vs->host.beat, __ATOMIC_ACQUIRE))
		cpu_relax();
}

static void world_stop(struct world *w)
{
	if (!w->running)
		return;
	__atomic_store_n(&w->m.stop, 1, __ATOMIC_RELEASE);
	pthread_join(w->thread, NULL);
	w->running = false;
}

static void world_free(struct world *w)
{
	world_stop(w);
	free(w->hdr);
	free(w);
}

/* The exit path: the same handlers, no ring (the PIO mailbox's VMM side). */
static void exit_call(struct world *w, u16 op, const u64 *args,
		      struct sc_reply *r)
{
	spin_for(EXIT_COST);
	r->by_sidecall = false;
	r->status = dispatch(&w->m, op, args, r->words);
}

/* Guest misbehaviour the protocol must survive. */
static void scribble(struct world *w, u64 *rng)
{
	struct sc_slot *s = &w->vs->slots[rnd(rng) % SC_RING_SLOTS];

	switch (rnd(rng) % 4) {
	case 0:
		WRITE_ONCE(w->vs->consumer.value, rnd(rng));
		break;
	case 1:
		w->c.ticket = rnd(rng) & SC_TICKET_MASK;
		w->c.from_consumer = false;
		break;
	case 2: {
		/* A null request of some ticket: harmless if carried out. */
		u64 t = rnd(rng) & SC_TICKET_MASK;
		u64 cur = READ_ONCE(s->state);

		if ((cur & 0xf) == SC_CLAIMED)
			break;	/* never over a claim, even scribbling */
		WRITE_ONCE(s->head, SIDECALL_OP_NULL);
		smp_store_release(&s->state, sc_state_word(t, rnd(rng) % 6));
		break;
	}
	default:
		break;
	}
}

struct outcome {
	u64 calls, by_sidecall, by_exit, lost, max_ns;
};

/*
 * Makes @n calls, nine in ten HC_COUNTER_ADD, and checks each reply and,
 * at the end, that every call ran exactly once.
 */
static struct outcome run_calls(struct world *w, int n, bool chaos,
				const char *name)
{
	struct outcome o = { 0 };
	u64 rng = 0x2545f4914f6cdd1dull, expect = 0;
	static bool lost[MAX_CALLS], counted[MAX_CALLS];
	int i;

	memset(lost, 0, sizeof(lost));
	memset(counted, 0, sizeof(counted));

	for (i = 0; i < n && i < MAX_CALLS; i++) {
		u64 args[SIDECORE_WORDS] = { rnd(&rng) % 13 + 1, (u64)i };
		u16 op = (rnd(&rng) % 10) ? SIDECALL_HC_COUNTER_ADD :
					    SIDECALL_OP_NULL;
		struct sc_reply r;
		u64 t0, dt;

		counted[i] = op == SIDECALL_HC_COUNTER_ADD;
		if (chaos && rnd(&rng) % 16 == 0)
			scribble(w, &rng);
		memset(&r, 0, sizeof(r));
		t0 = sc_env_now();
		if (!sc_try_sidecall(&w->c, op, args, &r))
			exit_call(w, op, args, &r);
		dt = sc_env_now() - t0;
		if (dt > o.max_ns)
			o.max_ns = dt;
		o.calls++;
		if (r.by_sidecall)
			o.by_sidecall++;
		else
			o.by_exit++;
		if (op == SIDECALL_OP_NULL) {
			if (r.status != SIDECALL_ST_OK || r.words[0] != args[0])
				fail("%s: null call %d: status %u word %#llx, sent %#llx",
				     name, i, r.status,
				     (unsigned long long)r.words[0],
				     (unsigned long long)args[0]);
			continue;
		}
		if (r.status == SIDECALL_ST_HOST_ERROR && r.by_sidecall) {
			/* Lost: carried out or not, never twice. */
			lost[i] = true;
			o.lost++;
			if (__atomic_load_n(&w->m.executed[i], __ATOMIC_SEQ_CST))
				expect += args[0];
			continue;
		}
		expect += args[0];
		if (r.status != SIDECALL_ST_OK || r.words[0] != expect)
			fail("%s: counter_add %d by %s: status %u value %llu, expected %llu",
			     name, i, r.by_sidecall ? "sidecall" : "exit path",
			     r.status, (unsigned long long)r.words[0],
			     (unsigned long long)expect);
		if (failures > 10)
			exit(1);
	}
	for (i = 0; i < n && i < MAX_CALLS; i++) {
		u8 e = __atomic_load_n(&w->m.executed[i], __ATOMIC_SEQ_CST);

		if (counted[i] && (e > 1 || (e == 0 && !lost[i])))
			fail("%s: counter_add %d carried out %u times", name,
			     i, e);
	}
	if (__atomic_load_n(&w->m.counter, __ATOMIC_SEQ_CST) != expect)
		fail("%s: counter %llu, expected %llu", name,
		     (unsigned long long)w->m.counter,
		     (unsigned long long)expect);
	if (o.max_ns > CLAIM_LIMIT + 50 * BOUND + 500000000ull)
		fail("%s: a call took %llu ns", name,
		     (unsigned long long)o.max_ns);
	return o;
}

static void report(const char *name, const struct world *w,
		   const struct outcome *o)
{
	const struct sc_guest_counters *g = &w->vs->guest;

	printf("%-8s calls %llu: sidecall %llu, exit %llu, lost %llu, max %llu us | guest: sidecalls %llu fallbacks %llu late %llu probes %llu paused %llu abandoned %llu | model: served %llu skipped %llu bad_seq %llu released %llu lost_claims %llu pauses %llu\n",
	       name, (unsigned long long)o->calls,
	       (unsigned long long)o->by_sidecall,
	       (unsigned long long)o->by_exit, (unsigned long long)o->lost,
	       (unsigned long long)o->max_ns / 1000,
	       (unsigned long long)g->sidecalls,
	       (unsigned long long)g->fallbacks,
	       (unsigned long long)g->late_replies,
	       (unsigned long long)g->probes,
	       (unsigned long long)g->paused_exits,
	       (unsigned long long)g->abandoned,
	       (unsigned long long)w->m.served,
	       (unsigned long long)w->m.skipped,
	       (unsigned long long)w->m.bad_sequence,
	       (unsigned long long)w->m.released,
	       (unsigned long long)w->m.lost_claims,
	       (unsigned long long)w->m.pauses);
}

/* ---- Single-step checks of try_post (ring.rs's own tests) ---- */

static void test_try_post(void)
{
	static struct sc_slot s __aligned(64);
	u64 w[SIDECORE_WORDS] = { 1, 1, 1, 1, 1, 1 };
	const int st[2] = { SC_DONE, SC_SKIPPED };
	u64 t = 70; /* slot 6 */
	int i;

	s.state = sc_state_word(3, SC_CLAIMED);
	s.head = 42;
	if (sc_try_post(&s, 3, 7, w, true) != SC_TP_BUSY || s.head != 42)
		fail("try_post wrote over a claim");
	s.state = sc_state_word(9, SC_POSTED);
	if (sc_try_post(&s, 3, 7, w, false) != SC_TP_POSTED ||
	    s.state != sc_state_word(3, SC_POSTED) || s.head != 7)
		fail("try_post did not take a stale post");
	for (i = 0; i < 2; i++) {
		s.state = sc_state_word(t, st[i]);
		if (sc_try_post(&s, t, 1, w, false) != SC_TP_PASSED)
			fail("finished word of the same ticket is not Passed");
		s.state = sc_state_word(t + 64, st[i]);
		if (sc_try_post(&s, t, 1, w, false) != SC_TP_FOREIGN)
			fail("finished word of a later lap is not Foreign");
		s.state = sc_state_word(t - 64, st[i]);
		if (sc_try_post(&s, t, 1, w, false) != SC_TP_POSTED)
			fail("finished word of the previous lap is not free");
	}
	s.state = sc_state_word(5, SC_DONE);
	if (sc_try_post(&s, t, 1, w, false) != SC_TP_POSTED)
		fail("finished word of another slot is not the guest's");
	s.state = sc_state_word(t + 64, SC_DONE);
	if (sc_try_post(&s, t, 1, w, true) != SC_TP_POSTED)
		fail("trusted ticket not posted over a foreign lap");
	s.state = sc_state_word(9, SC_POSTED);
	if (!sc_try_cancel(&s, 9) || sc_try_cancel(&s, 9))
		fail("cancel: not exactly once");
	if (sc_ticket_distance(SC_TICKET_MASK, 0) != 1 ||
	    sc_ticket_distance(0, SC_TICKET_MASK) != -1)
		fail("ticket distance does not wrap");
}

/* ---- Scenarios ---- */

static void scenario(const char *name, int calls, bool chaos,
		     void (*setup)(struct model *m))
{
	struct world *w = world_new();
	struct outcome o;

	if (setup)
		setup(&w->m);
	world_start(w);
	o = run_calls(w, calls, chaos, name);
	world_stop(w);
	report(name, w, &o);
	if (!strcmp(name, "steady") && o.by_sidecall < o.calls / 2)
		printf("note: steady: only %llu of %llu calls by sidecall (a loaded machine?)\n",
		       (unsigned long long)o.by_sidecall,
		       (unsigned long long)o.calls);
	world_free(w);
}

static void setup_slow(struct model *m)
{
	m->slow_claim_pct = 2;
	m->slow_reply_pct = 2;
}

static void setup_pause(struct model *m)
{
	m->pauses_now_and_then = true;
}

static void setup_chaos(struct model *m)
{
	m->slow_claim_pct = 1;
	m->slow_reply_pct = 1;
	m->pauses_now_and_then = true;
}

/* A sidecore that claims a call and hangs: abandoned, then lost for good. */
static void scenario_hang(void)
{
	struct world *w = world_new();
	struct outcome o;

	w->m.hang_once = true;
	world_start(w);
	/* 4000 calls: enough for one to reach the sidecore on a loaded host. */
	o = run_calls(w, 4000, false, "hang");
	/* The VMM then says the sidecore is gone: no more probes. */
	WRITE_ONCE(w->vs->host.sidecore_lost, 1);
	world_stop(w);
	report("hang", w, &o);
	if (w->vs->guest.abandoned != 1 || w->c.lost != 1 || o.lost != 1)
		fail("hang: abandoned %llu, lost %llu/%llu; expected 1 each",
		     (unsigned long long)w->vs->guest.abandoned,
		     (unsigned long long)w->c.lost,
		     (unsigned long long)o.lost);
	{
		u64 before = w->vs->guest.probes + w->vs->guest.fallbacks;
		struct sc_reply r;
		u64 args[SIDECORE_WORDS] = { 0 };

		spin_for(2 * BACKOFF);
		if (sc_try_sidecall(&w->c, SIDECALL_OP_NULL, args, &r) ||
		    w->vs->guest.probes + w->vs->guest.fallbacks != before)
			fail("hang: a lost sidecore was probed again");
	}
	world_free(w);
}

/* A sidecore that went away without a word: fall back, back off, probe. */
static void scenario_gone(void)
{
	struct world *w = world_new();
	struct outcome o;
	u64 t0 = sc_env_now(), ms;

	o = run_calls(w, 3000, false, "gone");
	ms = (sc_env_now() - t0) / 1000000;
	report("gone", w, &o);
	if (o.by_sidecall)
		fail("gone: %llu calls answered by nobody's sidecall",
		     (unsigned long long)o.by_sidecall);
	/* One fallback per back-off period at most, plus the first. */
	if (w->vs->guest.fallbacks > 1 + (ms * 1000000) / BACKOFF + 1)
		fail("gone: %llu fallbacks in %llu ms: not backing off",
		     (unsigned long long)w->vs->guest.fallbacks,
		     (unsigned long long)ms);
	if (w->vs->guest.probes + 1 != w->vs->guest.fallbacks)
		fail("gone: probes %llu, fallbacks %llu",
		     (unsigned long long)w->vs->guest.probes,
		     (unsigned long long)w->vs->guest.fallbacks);
	world_free(w);
}

/* A ring paused on purpose: straight to the exit path, counted. */
static void scenario_paused_flag(void)
{
	struct world *w = world_new();
	struct outcome o;

	WRITE_ONCE(w->vs->host.paused, 1);
	o = run_calls(w, 100, false, "paused");
	report("paused", w, &o);
	if (o.by_exit != 100 || w->vs->guest.paused_exits != 100 ||
	    w->vs->guest.fallbacks)
		fail("paused: %llu exits, %llu paused_exits, %llu fallbacks",
		     (unsigned long long)o.by_exit,
		     (unsigned long long)w->vs->guest.paused_exits,
		     (unsigned long long)w->vs->guest.fallbacks);
	world_free(w);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	test_try_post();
	scenario("steady", 20000, false, NULL);
	scenario("slow", 20000, false, setup_slow);
	scenario("pause", 20000, false, setup_pause);
	scenario("chaos", 20000, true, setup_chaos);
	scenario_hang();
	scenario_gone();
	scenario_paused_flag();
	if (failures) {
		printf("ring-test: %d failures\n", failures);
		return 1;
	}
	printf("ring-test: all scenarios passed\n");
	return 0;
}
