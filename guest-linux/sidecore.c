// SPDX-License-Identifier: GPL-2.0
/*
 * sidecore.ko: the Linux guest's sidecall client.
 *
 * The Sidecore VMM reserves a shared region (shm-proto ABI v2: a header
 * page, then one 8 KiB block per vCPU with its ring of 64 slots) and names
 * it on the command line as sidecore.region=0xGPA,0xSIZE. A sidecore thread
 * on another host CPU polls the rings and answers calls without a VM exit.
 * This module is the guest side of that slot protocol, following
 * shm-proto/src/ring.rs, shm-proto/src/sidecall.rs and the reference client
 * guest-agent/src/client.rs rule for rule: a call is posted into the CPU's
 * ring, waited for within a bound, and withdrawn by compare-and-swap
 * (POSTED -> CANCELLED) before it is carried out by its exit path instead,
 * so that no call is ever carried out twice. A call the sidecore claimed is
 * waited for, as long as the ring's heartbeat moves.
 *
 * Ring i belongs to the CPU whose APIC ID is i. A call keeps interrupts off
 * from its first write to the ring to its last read of the reply: the CPU's
 * client state, ring and exit-path mailbox are used by one call at a time.
 * Every wait is bounded in TSC time.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/build_bug.h>
#include <linux/cpu.h>
#include <linux/cpuhotplug.h>
#include <linux/fs.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/irqflags.h>
#include <linux/kernel.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/preempt.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/stddef.h>
#include <linux/string.h>
#include <linux/uaccess.h>

#include <asm/cpufeature.h>
#include <asm/fpu/xcr.h>
#include <asm/msr.h>
#include <asm/processor.h>
#include <asm/tlbflush.h>
#include <asm/tsc.h>

#include "sidecall_ring.h"
#include "sidecall_uapi.h"
#include "sidecore.h"

/* Exit paths (shm-proto/src/boot.rs and the Linux client spec). */
#define SC_PORT_CALL		0x3f2
#define SC_HC_NULL_NR		0x7fff0000UL	/* a number KVM does not know */
#define SC_KVM_ENOSYS		(-1000L)	/* what KVM answers for it */

#define SC_MSR_XSS		0xda0

/* Refuse larger regions: 4096 vCPU blocks is far past any VM here. */
#define SC_REGION_MAX		(SC_VCPU_OFFSET + 4096ULL * SC_VCPU_STRIDE)

/* ---- Module state ---- */

static char *region;
module_param(region, charp, 0444);
MODULE_PARM_DESC(region,
		 "the shared region as 0xGPA,0xSIZE (the VMM puts sidecore.region= on the kernel command line)");

/* A CPU: its ring client and what a CPUID request needs to say. */
struct sc_cpu {
	struct sc_client c;	/* c.vs NULL: no vCPU block */
	u32 apic_id;
	/* MSRs KVM derives CPUID bits from that Linux sets once at boot. */
	u64 xss;
	u64 apic_base;
	u64 exit_calls;		/* calls an exit path answered */
};

static DEFINE_PER_CPU(struct sc_cpu, sc_cpus);

static struct {
	void *base;
	struct sc_ring_ctx ctx;
	u64 gpa;
	u64 size;
	u32 nr_vcpus;
	u64 features;
	u64 chunk;		/* bench: interrupts off at most this long */
	bool amd;		/* vmmcall, else vmcall */
	int hp_state;
} sc;

/* One selftest or bench at a time: the counter check needs the CPU alone. */
static DEFINE_MUTEX(sc_test_lock);

/*
 * The words of a request; a CPUID request (v2) carries the CPU's state KVM
 * derives CPUID bits from. CR4 and XCR0 are read now (neither read leaves
 * the guest); IA32_XSS and IA32_APIC_BASE, which Linux sets once at boot
 * and whose reads are intercepted, were read when the CPU came up.
 */
static void sc_request_words(struct sc_cpu *p, u16 op, const u64 *args,
			     u64 *w)
{
	memcpy(w, args, SIDECORE_WORDS * sizeof(u64));
	if (op == SIDECALL_OP_CPUID) {
		u64 cr4 = cr4_read_shadow();

		w[2] = cr4;
		w[3] = (cr4 & X86_CR4_OSXSAVE) ? xgetbv(XCR_XFEATURE_ENABLED_MASK)
					       : 1;
		w[4] = p->xss;
		w[5] = p->apic_base;
	}
}

static long sc_hypercall(unsigned long nr)
{
	long ret;

	if (sc.amd)
		asm volatile("vmmcall" : "=a"(ret) : "a"(nr) : "memory");
	else
		asm volatile("vmcall" : "=a"(ret) : "a"(nr) : "memory");
	return ret;
}

static void sc_cpuid_insn(u32 leaf, u32 sub, u32 regs[4])
{
	regs[0] = leaf;
	regs[2] = sub;
	native_cpuid(&regs[0], &regs[1], &regs[2], &regs[3]);
}

/* The PIO mailbox: the VMM answers with the sidecore's own handlers. */
static void sc_pio_call(struct sc_cpu *p, u16 op, const u64 *args,
			struct sc_reply *r)
{
	struct sc_slot *s = &p->c.vs->exit_slot;
	u64 w[SIDECORE_WORDS];

	sc_request_words(p, op, args, w);
	sc_write_body(s, sc_head(op), w);
	/* Release: the VMM reads the body after POSTED. */
	smp_store_release(&s->state, sc_state_word(0, SC_POSTED));
	outl(0, SC_PORT_CALL);
	/* Acquire: the reply is read after DONE. */
	if (smp_load_acquire(&s->state) == sc_state_word(0, SC_DONE)) {
		sc_read_reply(s, r);
	} else {
		r->status = SIDECALL_ST_HOST_ERROR;
		memset(r->words, 0, sizeof(r->words));
	}
}

/*
 * The op's exit path: NULL by the hypercall KVM answers in the kernel (the
 * null call does nothing, so once KVM answered, its result is the echo the
 * sidecore would have sent), CPUID by the instruction, everything else by
 * the PIO mailbox.
 */
static void sc_exit_call(struct sc_cpu *p, u16 op, const u64 *args,
			 struct sc_reply *r)
{
	p->exit_calls++;
	r->by_sidecall = false;
	if (op == SIDECALL_OP_NULL) {
		long ret = sc_hypercall(SC_HC_NULL_NR);

		memset(r->words, 0, sizeof(r->words));
		if (ret == SC_KVM_ENOSYS) {
			r->status = SIDECALL_ST_OK;
			r->words[0] = args[0];
		} else {
			r->status = SIDECALL_ST_HOST_ERROR;
			r->words[0] = ret;
		}
		return;
	}
	if (op == SIDECALL_OP_CPUID && args[0] <= U32_MAX &&
	    args[1] <= U32_MAX) {
		u32 regs[4];
		int i;

		sc_cpuid_insn(args[0], args[1], regs);
		memset(r->words, 0, sizeof(r->words));
		for (i = 0; i < 4; i++)
			r->words[i] = regs[i];
		r->status = SIDECALL_ST_OK;
		return;
	}
	sc_pio_call(p, op, args, r);
}

/* This CPU, or NULL when its APIC ID has no vCPU block. */
static struct sc_cpu *sc_this_cpu(void)
{
	struct sc_cpu *p = this_cpu_ptr(&sc_cpus);

	/* Pairs with the release in sc_cpu_online(). */
	return smp_load_acquire(&p->c.vs) ? p : NULL;
}

/*
 * Client::call with interrupts off: by sidecall when a sidecore serves the
 * ring, else (or when it does not answer in time) by the exit path, once.
 */
static int sc_call_irqs_off(u16 op, const u64 *args, struct sc_reply *r)
{
	struct sc_cpu *p = sc_this_cpu();
	u64 w[SIDECORE_WORDS];

	lockdep_assert_irqs_disabled();
	if (!p)
		return -ENODEV;
	sc_request_words(p, op, args, w);
	if (!sc_try_sidecall(&p->c, op, w, r))
		sc_exit_call(p, op, args, r);
	return 0;
}

static int sc_call(u16 op, const u64 *args, struct sc_reply *r)
{
	unsigned long flags;
	int ret;

	/* An NMI may have interrupted a call on this very ring. */
	if (in_nmi())
		return -EBUSY;
	local_irq_save(flags);
	ret = sc_call_irqs_off(op, args, r);
	local_irq_restore(flags);
	return ret;
}

/* ---- Exported interface ---- */

int sidecore_call(u16 op, const u64 args[SIDECORE_WORDS],
		  u64 out[SIDECORE_WORDS], u32 *status, bool *by_sidecall)
{
	struct sc_reply r;
	int ret = sc_call(op, args, &r);

	if (ret)
		return ret;
	if (out)
		memcpy(out, r.words, sizeof(r.words));
	if (status)
		*status = r.status;
	if (by_sidecall)
		*by_sidecall = r.by_sidecall;
	return 0;
}
EXPORT_SYMBOL_GPL(sidecore_call);

int sidecore_null(u64 v)
{
	u64 args[SIDECORE_WORDS] = { v };
	struct sc_reply r;
	int ret = sc_call(SIDECALL_OP_NULL, args, &r);

	if (ret)
		return ret;
	return (r.status == SIDECALL_ST_OK && r.words[0] == v) ? 0 : -EIO;
}
EXPORT_SYMBOL_GPL(sidecore_null);

int sidecore_cpuid(u32 leaf, u32 sub, u32 regs[4])
{
	u64 args[SIDECORE_WORDS] = { leaf, sub };
	struct sc_reply r;
	int ret = sc_call(SIDECALL_OP_CPUID, args, &r);
	int i;

	if (ret)
		return ret;
	if (r.status != SIDECALL_ST_OK)
		return -EIO;
	for (i = 0; i < 4; i++)
		regs[i] = r.words[i];
	return 0;
}
EXPORT_SYMBOL_GPL(sidecore_cpuid);

int sidecore_counter_add(u64 v, u64 *new)
{
	u64 args[SIDECORE_WORDS] = { v };
	struct sc_reply r;
	int ret = sc_call(SIDECALL_HC_COUNTER_ADD, args, &r);

	if (ret)
		return ret;
	if (r.status != SIDECALL_ST_OK)
		return -EIO;
	if (new)
		*new = r.words[0];
	return 0;
}
EXPORT_SYMBOL_GPL(sidecore_counter_add);

/* ---- /dev/sidecall: INFO ---- */

static long sc_ioctl_info(void __user *arg)
{
	struct sidecall_info info;
	unsigned int cpu;
	struct sc_cpu *p;
	u32 i;

	memset(&info, 0, sizeof(info));
	info.nr_vcpus = sc.nr_vcpus;
	info.region_gpa = sc.gpa;
	info.region_size = sc.size;
	info.tsc_khz = tsc_khz;
	info.features = sc.features;
	info.reply_bound = sc.ctx.bound;

	preempt_disable();
	info.cpu = smp_processor_id();
	info.apic_id = cpu_data(info.cpu).apicid;
	p = sc_this_cpu();
	if (p) {
		struct sc_host_status *host = &p->c.vs->host;

		info.has_ring = 1;
		info.served = !READ_ONCE(host->sidecore_lost) &&
			      !READ_ONCE(host->paused);
		info.absent = READ_ONCE(p->c.absent);
	}
	preempt_enable();

	for (i = 0; i < sc.nr_vcpus; i++) {
		struct sc_vcpu *vs = sc.base + SC_VCPU_OFFSET +
				     (u64)i * SC_VCPU_STRIDE;
		struct sc_guest_counters *g = &vs->guest;

		info.counters[SIDECALL_CNT_SIDECALLS] += READ_ONCE(g->sidecalls);
		info.counters[SIDECALL_CNT_FALLBACKS] += READ_ONCE(g->fallbacks);
		info.counters[SIDECALL_CNT_LATE_REPLIES] +=
			READ_ONCE(g->late_replies);
		info.counters[SIDECALL_CNT_PROBES] += READ_ONCE(g->probes);
		info.counters[SIDECALL_CNT_PAUSED_EXITS] +=
			READ_ONCE(g->paused_exits);
		info.counters[SIDECALL_CNT_ABANDONED] += READ_ONCE(g->abandoned);
	}
	/* Other CPUs' counts move meanwhile: each is read once. */
	for_each_possible_cpu(cpu) {
		p = per_cpu_ptr(&sc_cpus, cpu);
		info.counters[SIDECALL_CNT_EXIT_CALLS] += READ_ONCE(p->exit_calls);
		info.counters[SIDECALL_CNT_LOST] += READ_ONCE(p->c.lost);
	}

	return copy_to_user(arg, &info, sizeof(info)) ? -EFAULT : 0;
}

/* ---- /dev/sidecall: BENCH ---- */

/* Samples per interrupts-off stretch (also bounded by sc.chunk cycles). */
#define SC_BENCH_CHUNK 64

/* One timed call; *@fell_back: a sidecall the exit path answered. */
static int sc_bench_one(const struct sidecall_bench *b, u64 i, bool *fell_back)
{
	u64 args[SIDECORE_WORDS] = { 0 };
	struct sc_reply r;
	u32 regs[4];
	int ret;

	*fell_back = false;
	switch (b->path) {
	case SIDECALL_PATH_SIDECALL:
		if (b->op == SIDECALL_BENCH_NULL)
			args[0] = i;
		ret = sc_call_irqs_off(b->op == SIDECALL_BENCH_NULL ?
				       SIDECALL_OP_NULL : SIDECALL_OP_CPUID,
				       args, &r);
		if (ret)
			return ret;
		if (r.status != SIDECALL_ST_OK)
			return -EIO;
		*fell_back = !r.by_sidecall;
		return 0;
	case SIDECALL_PATH_HYPERCALL:
		return sc_hypercall(SC_HC_NULL_NR) == SC_KVM_ENOSYS ? 0 : -EIO;
	default:
		sc_cpuid_insn(0, 0, regs);
		return 0;
	}
}

static long sc_ioctl_bench(void __user *arg)
{
	struct sidecall_bench b;
	u64 __user *usamples;
	u64 *samples, total, i = 0, fallbacks = 0;
	long ret = 0;

	if (copy_from_user(&b, arg, sizeof(b)))
		return -EFAULT;
	if (!((b.op == SIDECALL_BENCH_NULL &&
	       (b.path == SIDECALL_PATH_SIDECALL ||
		b.path == SIDECALL_PATH_HYPERCALL)) ||
	      (b.op == SIDECALL_BENCH_CPUID &&
	       (b.path == SIDECALL_PATH_SIDECALL ||
		b.path == SIDECALL_PATH_CPUID_INSN))))
		return -EINVAL;
	if (b.iters == 0 || b.iters > SIDECALL_BENCH_MAX_ITERS ||
	    b.warmup > SIDECALL_BENCH_MAX_ITERS || b.pad)
		return -EINVAL;
	usamples = u64_to_user_ptr(b.samples);
	samples = kvmalloc_array(b.iters, sizeof(u64), GFP_KERNEL);
	if (!samples)
		return -ENOMEM;

	mutex_lock(&sc_test_lock);
	migrate_disable();
	b.cpu = smp_processor_id();
	total = (u64)b.warmup + b.iters;
	while (i < total) {
		unsigned long flags;
		u64 chunk_start;

		local_irq_save(flags);
		chunk_start = rdtsc();
		do {
			bool fell_back;
			u64 t0, t1;

			t0 = rdtsc_ordered();
			ret = sc_bench_one(&b, i, &fell_back);
			t1 = rdtsc_ordered();
			if (ret)
				break;
			if (i >= b.warmup) {
				samples[i - b.warmup] = t1 - t0;
				fallbacks += fell_back;
			}
			i++;
		} while (i < total && i % SC_BENCH_CHUNK &&
			 rdtsc() - chunk_start < sc.chunk);
		local_irq_restore(flags);
		if (ret)
			break;
		if (fatal_signal_pending(current)) {
			ret = -EINTR;
			break;
		}
		cond_resched();
	}
	migrate_enable();
	mutex_unlock(&sc_test_lock);

	if (!ret) {
		b.fallbacks = fallbacks;
		if (copy_to_user(usamples, samples, (size_t)b.iters * sizeof(u64)) ||
		    copy_to_user(arg, &b, sizeof(b)))
			ret = -EFAULT;
	}
	kvfree(samples);
	return ret;
}

/* ---- /dev/sidecall: SELFTEST ---- */

static __printf(3, 4) void sc_check(struct sidecall_selftest *st, bool ok,
				    const char *fmt, ...)
{
	va_list ap;

	st->checks++;
	if (ok)
		return;
	if (!st->failures++) {
		va_start(ap, fmt);
		vsnprintf(st->message, sizeof(st->message), fmt, ap);
		va_end(ap);
	}
}

static void sc_count_path(struct sidecall_selftest *st,
			  const struct sc_reply *r)
{
	if (r->by_sidecall)
		st->by_sidecall++;
	else
		st->by_exit++;
}

static const char *sc_status_name(u32 status)
{
	static const char *const names[] = {
		"ok", "unknown_op", "reserved_bits", "bad_sequence",
		"bad_argument", "denied", "use_exit_path", "host_error",
	};

	return status < ARRAY_SIZE(names) ? names[status] : "?";
}

static const char *sc_path_name(const struct sc_reply *r)
{
	return r->by_sidecall ? "sidecall" : "exit path";
}

/* (a) NULL by sidecall echoes its word; the hypercall gives -KVM_ENOSYS. */
static void sc_selftest_null(struct sidecall_selftest *st)
{
	unsigned long flags;
	int i;

	for (i = 0; i < 64; i++) {
		u64 args[SIDECORE_WORDS] = { 0x5eed000000000000ULL ^
					     (i * 0x9e3779b97f4a7c15ULL) };
		struct sc_reply r;
		int ret = sc_call(SIDECALL_OP_NULL, args, &r);

		sc_check(st, !ret, "null call %d: error %d", i, ret);
		if (ret)
			return;
		sc_count_path(st, &r);
		sc_check(st, r.status == SIDECALL_ST_OK && r.words[0] == args[0],
			 "null call %d by %s: status %s, word %#llx, sent %#llx",
			 i, sc_path_name(&r), sc_status_name(r.status),
			 r.words[0], args[0]);
	}
	for (i = 0; i < 4; i++) {
		long ret;

		local_irq_save(flags);
		ret = sc_hypercall(SC_HC_NULL_NR);
		local_irq_restore(flags);
		sc_check(st, ret == SC_KVM_ENOSYS,
			 "%s with RAX=%#lx returned %ld, expected %ld",
			 sc.amd ? "vmmcall" : "vmcall", SC_HC_NULL_NR, ret,
			 SC_KVM_ENOSYS);
	}
}

/* Leaves past these are not walked (no CPU has that many). */
#define SC_MAX_BASIC_LEAVES	0x100
#define SC_MAX_EXT_LEAVES	0x100

static void sc_selftest_leaf(struct sidecall_selftest *st, u32 leaf, u32 sub)
{
	u64 args[SIDECORE_WORDS] = { leaf, sub };
	struct sc_reply r;
	unsigned long flags;
	u32 want[4];
	int ret;

	local_irq_save(flags);
	sc_cpuid_insn(leaf, sub, want);
	ret = sc_call_irqs_off(SIDECALL_OP_CPUID, args, &r);
	local_irq_restore(flags);
	sc_check(st, !ret, "cpuid %#x.%u: error %d", leaf, sub, ret);
	if (ret)
		return;
	sc_count_path(st, &r);
	sc_check(st, r.status == SIDECALL_ST_OK &&
		 r.words[0] == want[0] && r.words[1] == want[1] &&
		 r.words[2] == want[2] && r.words[3] == want[3],
		 "cpuid %#x.%u by %s: status %s, %08llx %08llx %08llx %08llx; cpuid insn %08x %08x %08x %08x",
		 leaf, sub, sc_path_name(&r), sc_status_name(r.status),
		 r.words[0], r.words[1],
		 r.words[2], r.words[3], want[0], want[1], want[2], want[3]);
}

static void sc_selftest_leaves(struct sidecall_selftest *st, u32 first,
			       u32 last)
{
	u32 leaf, sub;

	for (leaf = first; leaf <= last; leaf++) {
		for (sub = 0; sub < 4; sub++)
			sc_selftest_leaf(st, leaf, sub);
		cond_resched();
	}
}

/* (b) CPUID by sidecall equals the instruction, leaf for leaf. */
static void sc_selftest_cpuid(struct sidecall_selftest *st)
{
	u32 regs[4];

	sc_cpuid_insn(0, 0, regs);
	sc_check(st, regs[0] < SC_MAX_BASIC_LEAVES,
		 "cpuid 0: max basic leaf %#x, walking only %#x", regs[0],
		 SC_MAX_BASIC_LEAVES - 1);
	sc_selftest_leaves(st, 0, min_t(u32, regs[0], SC_MAX_BASIC_LEAVES - 1));
	sc_selftest_leaves(st, 0x40000000, 0x40000000);
	sc_cpuid_insn(0x80000000, 0, regs);
	if (regs[0] >= 0x80000000) {
		sc_check(st, regs[0] < 0x80000000 + SC_MAX_EXT_LEAVES,
			 "cpuid 0x80000000: max extended leaf %#x", regs[0]);
		sc_selftest_leaves(st, 0x80000000,
				   min_t(u32, regs[0],
					 0x80000000 + SC_MAX_EXT_LEAVES - 1));
	}
}

#define SC_COUNTER_CALLS 1000

/*
 * (c) HC_COUNTER_ADD grows the vCPU's counter by exactly what was added,
 * by sidecall and by the PIO mailbox in turn: no call applied twice, none
 * lost.
 */
static void sc_selftest_counter(struct sidecall_selftest *st)
{
	u64 args[SIDECORE_WORDS] = { 0 };
	struct sc_reply r = { 0 };
	u64 expect;
	int i, ret;

	ret = sc_call(SIDECALL_HC_COUNTER_ADD, args, &r);
	sc_check(st, !ret && r.status == SIDECALL_ST_OK,
		 "counter_add 0 by %s: error %d, status %s", sc_path_name(&r),
		 ret, sc_status_name(r.status));
	if (ret || r.status != SIDECALL_ST_OK)
		return;
	sc_count_path(st, &r);
	expect = r.words[0];

	for (i = 0; i < SC_COUNTER_CALLS; i++) {
		struct sc_cpu *p;
		unsigned long flags;
		bool by_pio = i & 1;

		args[0] = (i * 7) % 13 + 1;
		expect += args[0];
		ret = -ENODEV;
		local_irq_save(flags);
		p = sc_this_cpu();
		if (by_pio && p) {
			sc_pio_call(p, SIDECALL_HC_COUNTER_ADD, args, &r);
			r.by_sidecall = false;
			ret = 0;
		} else if (!by_pio) {
			ret = sc_call_irqs_off(SIDECALL_HC_COUNTER_ADD, args, &r);
		}
		local_irq_restore(flags);
		if (ret) {
			sc_check(st, false, "counter_add #%d: error %d", i, ret);
			return;
		}
		sc_count_path(st, &r);
		sc_check(st, r.status == SIDECALL_ST_OK && r.words[0] == expect,
			 "counter_add #%d (+%llu) by %s: status %s, value %llu, expected %llu",
			 i, args[0], by_pio ? "PIO mailbox" : sc_path_name(&r),
			 sc_status_name(r.status), r.words[0], expect);
		if (r.status != SIDECALL_ST_OK || r.words[0] != expect)
			return;
		if (i % 64 == 63)
			cond_resched();
	}
}

static long sc_ioctl_selftest(void __user *arg)
{
	struct sidecall_selftest *st;
	long ret = 0;

	st = kzalloc(sizeof(*st), GFP_KERNEL);
	if (!st)
		return -ENOMEM;
	mutex_lock(&sc_test_lock);
	migrate_disable();
	st->cpu = smp_processor_id();
	st->apic_id = cpu_data(st->cpu).apicid;
	if (!sc_this_cpu()) {
		sc_check(st, false, "CPU %u (APIC ID %u) has no vCPU block",
			 st->cpu, st->apic_id);
	} else {
		sc_selftest_null(st);
		sc_selftest_cpuid(st);
		sc_selftest_counter(st);
	}
	migrate_enable();
	mutex_unlock(&sc_test_lock);
	if (copy_to_user(arg, st, sizeof(*st)))
		ret = -EFAULT;
	kfree(st);
	return ret;
}

static long sc_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case SIDECALL_IOC_INFO:
		return sc_ioctl_info(uarg);
	case SIDECALL_IOC_BENCH:
		return sc_ioctl_bench(uarg);
	case SIDECALL_IOC_SELFTEST:
		return sc_ioctl_selftest(uarg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations sc_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = sc_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice sc_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "sidecall",
	.fops = &sc_fops,
	.mode = 0600,
};

/* ---- CPUs coming and going ---- */

static int sc_cpu_online(unsigned int cpu)
{
	struct sc_cpu *p = per_cpu_ptr(&sc_cpus, cpu);
	u32 apic = cpu_data(cpu).apicid;
	struct sc_vcpu *vs;
	u64 v;

	WRITE_ONCE(p->c.vs, NULL);
	if (apic >= sc.nr_vcpus) {
		/* Checked for every CPU online at load: a later one. */
		pr_warn("CPU %u has APIC ID %u, past the region's %u vCPU blocks: it uses the exit paths only\n",
			cpu, apic, sc.nr_vcpus);
		return 0;
	}
	vs = sc.base + SC_VCPU_OFFSET + (u64)apic * SC_VCPU_STRIDE;
	p->apic_id = apic;
	p->xss = 0;
	if (boot_cpu_has(X86_FEATURE_XSAVES) &&
	    !rdmsrl_safe_on_cpu(cpu, SC_MSR_XSS, &v))
		p->xss = v;
	p->apic_base = 0;
	if (!rdmsrl_safe_on_cpu(cpu, MSR_IA32_APICBASE, &v))
		p->apic_base = v;
	/* Wherever the sidecore is: an earlier user may have used the ring. */
	sc_client_resume(&p->c, vs, &sc.ctx);
	return 0;
}

static int sc_cpu_offline(unsigned int cpu)
{
	WRITE_ONCE(per_cpu_ptr(&sc_cpus, cpu)->c.vs, NULL);
	return 0;
}

/* ---- Load and unload ---- */

/* One 0x-prefixed hex number of @len characters, strictly. */
static int sc_parse_hex(const char *s, size_t len, u64 *out)
{
	u64 v = 0;
	size_t i;

	if (len < 3 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X'))
		return -EINVAL;
	for (i = 2; i < len; i++) {
		int d = hex_to_bin(s[i]);

		if (d < 0 || v >> 60)
			return -EINVAL;
		v = (v << 4) | d;
	}
	*out = v;
	return 0;
}

static int sc_parse_region(const char *s, u64 *gpa, u64 *size)
{
	const char *comma;

	if (!s || !*s) {
		pr_err("no region given: load with region=0xGPA,0xSIZE (the VMM's sidecore.region= from /proc/cmdline)\n");
		return -ENODEV;
	}
	comma = strchr(s, ',');
	if (!comma || sc_parse_hex(s, comma - s, gpa) ||
	    sc_parse_hex(comma + 1, strlen(comma + 1), size)) {
		pr_err("region=%s: expected 0xGPA,0xSIZE (two 0x-prefixed hex numbers of at most 64 bits)\n",
		       s);
		return -EINVAL;
	}
	if (!PAGE_ALIGNED(*gpa) || !PAGE_ALIGNED(*size)) {
		pr_err("region=%s: address and size must be multiples of %lu\n",
		       s, PAGE_SIZE);
		return -EINVAL;
	}
	if (*size < SC_VCPU_OFFSET + SC_VCPU_STRIDE || *size > SC_REGION_MAX) {
		pr_err("region=%s: size %#llx is outside %#x..%#llx (a header page and 1..4096 vCPU blocks)\n",
		       s, *size, SC_VCPU_OFFSET + SC_VCPU_STRIDE, SC_REGION_MAX);
		return -EINVAL;
	}
	if (*gpa + *size < *gpa) {
		pr_err("region=%s: address plus size overflows\n", s);
		return -EINVAL;
	}
	return 0;
}

/* The region header: each field read once, then checked. */
static int sc_check_header(const struct sc_header *h, u64 size)
{
	u64 magic = READ_ONCE(h->magic);
	u32 abi = READ_ONCE(h->abi_version);
	u32 nr = READ_ONCE(h->nr_vcpus);
	u32 slots = READ_ONCE(h->ring_slots);
	u32 slot_size = READ_ONCE(h->slot_size);
	u64 off = READ_ONCE(h->vcpu_offset);
	u64 stride = READ_ONCE(h->vcpu_stride);
	u64 need;

	if (magic != SC_REGION_MAGIC) {
		pr_err("region header magic is %#llx, not %#llx (\"SIDECORE\"): no sidecore region at this address\n",
		       magic, SC_REGION_MAGIC);
		return -ENODEV;
	}
	if (abi != SC_ABI_VERSION) {
		pr_err("region ABI version is %u; this module speaks %u: use a matching VMM and module\n",
		       abi, SC_ABI_VERSION);
		return -EINVAL;
	}
	if (slots != SC_RING_SLOTS || slot_size != SC_SLOT_SIZE) {
		pr_err("region has %u slots of %u bytes per ring; expected %u of %u\n",
		       slots, slot_size, SC_RING_SLOTS, SC_SLOT_SIZE);
		return -EINVAL;
	}
	if (off != SC_VCPU_OFFSET || stride != SC_VCPU_STRIDE) {
		pr_err("region's vCPU blocks start at %#llx every %#llx bytes; expected %#x every %#x\n",
		       off, stride, SC_VCPU_OFFSET, SC_VCPU_STRIDE);
		return -EINVAL;
	}
	need = SC_VCPU_OFFSET + (u64)nr * SC_VCPU_STRIDE;
	if (nr < 1 || need > size) {
		pr_err("region header says %u vCPU blocks (%#llx bytes); the region is %#llx bytes\n",
		       nr, need, size);
		return -EINVAL;
	}
	sc.nr_vcpus = nr;
	sc.features = READ_ONCE(h->features);
	return 0;
}

/* Every online CPU needs a vCPU block: its APIC ID below nr_vcpus. */
static int sc_check_cpus(void)
{
	unsigned int cpu;

	for_each_online_cpu(cpu) {
		u32 apic = cpu_data(cpu).apicid;

		if (apic >= sc.nr_vcpus) {
			pr_err("CPU %u has APIC ID %u but the region has only %u vCPU blocks\n",
			       cpu, apic, sc.nr_vcpus);
			return -EINVAL;
		}
	}
	return 0;
}

static int __init sc_init(void)
{
	int ret;

	ret = sc_parse_region(region, &sc.gpa, &sc.size);
	if (ret)
		return ret;
	if (!tsc_khz) {
		pr_err("the TSC frequency is unknown: the reply bounds need it\n");
		return -ENODEV;
	}
	/* The guest-agent's defaults (linux-client-spec). */
	sc.ctx.bound = 2ULL * tsc_khz;				/* 2 ms */
	sc.ctx.backoff = 10 * sc.ctx.bound;
	sc.ctx.liveness = max(50 * sc.ctx.bound, 100ULL * tsc_khz); /* 100 ms */
	sc.ctx.claim_limit = 10 * sc.ctx.liveness;
	sc.chunk = tsc_khz;				/* 1 ms */
	sc.amd = boot_cpu_data.x86_vendor == X86_VENDOR_AMD ||
		 boot_cpu_data.x86_vendor == X86_VENDOR_HYGON;

	/* memremap() refuses a range part RAM, part not, with a splat. */
	if (region_intersects(sc.gpa, sc.size, IORESOURCE_SYSTEM_RAM,
			      IORES_DESC_NONE) == REGION_MIXED) {
		pr_err("the region %#llx+%#llx is partly System RAM: the VMM reserves all of it in the e820 map\n",
		       sc.gpa, sc.size);
		return -EINVAL;
	}
	sc.base = memremap(sc.gpa, sc.size, MEMREMAP_WB);
	if (!sc.base) {
		pr_err("cannot map the region %#llx+%#llx write-back (is it reserved in the e820 map?)\n",
		       sc.gpa, sc.size);
		return -ENOMEM;
	}
	sc.ctx.hdr = sc.base;
	ret = sc_check_header(sc.ctx.hdr, sc.size);
	if (ret)
		goto unmap;

	cpus_read_lock();
	ret = sc_check_cpus();
	if (!ret) {
		ret = cpuhp_setup_state_cpuslocked(CPUHP_AP_ONLINE_DYN,
						   "sidecore:online",
						   sc_cpu_online,
						   sc_cpu_offline);
		if (ret > 0) {
			sc.hp_state = ret;
			ret = 0;
		}
	}
	cpus_read_unlock();
	if (ret)
		goto unmap;

	ret = misc_register(&sc_misc);
	if (ret) {
		pr_err("cannot register /dev/sidecall: error %d\n", ret);
		goto hotplug;
	}
	pr_info("region %#llx+%#llx, %u vCPU blocks, features %#llx, TSC %u kHz, %s\n",
		sc.gpa, sc.size, sc.nr_vcpus, sc.features, tsc_khz,
		sc.amd ? "vmmcall" : "vmcall");
	return 0;

hotplug:
	cpuhp_remove_state(sc.hp_state);
unmap:
	memunmap(sc.base);
	sc.base = NULL;
	sc.ctx.hdr = NULL;
	return ret;
}

static void __exit sc_exit(void)
{
	misc_deregister(&sc_misc);
	cpuhp_remove_state(sc.hp_state);
	memunmap(sc.base);
}

module_init(sc_init);
module_exit(sc_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Sidecore sidecall client: calls to the VMM without VM exits");
