/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * /dev/sidecall: the interface between sidecore.ko and sidecall-tool.
 *
 * Shared by the module (kernel build) and the static userspace tool, so it
 * uses only the fixed-width __u* types of <linux/types.h>. Every structure
 * has explicit padding and the same layout on both sides.
 */
#ifndef SIDECALL_UAPI_H
#define SIDECALL_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define SIDECALL_DEVICE "/dev/sidecall"

/* Built-in opcodes and registry hypercalls of shm-proto's op.rs. */
#define SIDECALL_OP_NULL	1
#define SIDECALL_OP_CPUID	2
#define SIDECALL_OP_PTE_UPDATE	3
#define SIDECALL_HC_MONOTONIC_NS 0x100
#define SIDECALL_HC_COUNTER_ADD	0x101
#define SIDECALL_HC_MIX		0x102

/* Reply status codes of op.rs. */
#define SIDECALL_ST_OK			0
#define SIDECALL_ST_UNKNOWN_OP		1
#define SIDECALL_ST_RESERVED_BITS	2
#define SIDECALL_ST_BAD_SEQUENCE	3
#define SIDECALL_ST_BAD_ARGUMENT	4
#define SIDECALL_ST_DENIED		5
#define SIDECALL_ST_USE_EXIT_PATH	6
#define SIDECALL_ST_HOST_ERROR		7

/*
 * Counters. The first six are the vCPU blocks' GuestCounters (what the
 * guest-agent bumps, in its order) summed over every vCPU block; the last
 * two are the module's own.
 */
enum sidecall_counter {
	SIDECALL_CNT_SIDECALLS,		/* sidecalls that got a reply */
	SIDECALL_CNT_FALLBACKS,		/* withdrawn, or both slots busy */
	SIDECALL_CNT_LATE_REPLIES,	/* cancel lost to a claim: waited */
	SIDECALL_CNT_PROBES,		/* absent sidecore probed again */
	SIDECALL_CNT_PAUSED_EXITS,	/* ring paused: straight to exit */
	SIDECALL_CNT_ABANDONED,		/* claimed, heartbeat stood still */
	SIDECALL_CNT_EXIT_CALLS,	/* calls answered by an exit path */
	SIDECALL_CNT_LOST,		/* claimed calls nobody answered */
	SIDECALL_NR_COUNTERS,
};

struct sidecall_info {
	__u32 nr_vcpus;		/* RegionHeader.nr_vcpus */
	__u32 cpu;		/* the calling CPU (Linux number) */
	__u32 apic_id;		/* its APIC ID: its ring */
	__u32 has_ring;		/* 1: the CPU's APIC ID has a vCPU block */
	__u32 served;		/* 1: not sidecore_lost and not paused now */
	__u32 absent;		/* 1: this CPU's client backs off now */
	__u64 region_gpa;
	__u64 region_size;
	__u64 tsc_khz;
	__u64 features;		/* RegionHeader.features */
	__u64 reply_bound;	/* TSC cycles a sidecall waits for its reply */
	__u64 counters[SIDECALL_NR_COUNTERS];
};

/* SIDECALL_BENCH: what is measured. */
#define SIDECALL_BENCH_NULL	1	/* op: the null call */
#define SIDECALL_BENCH_CPUID	2	/* op: CPUID leaf 0 */

#define SIDECALL_PATH_SIDECALL	1	/* by sidecall, exit path on fallback */
#define SIDECALL_PATH_HYPERCALL	2	/* vmmcall/vmcall (op NULL only) */
#define SIDECALL_PATH_CPUID_INSN 3	/* the cpuid instruction (op CPUID) */

/* At most this many samples per SIDECALL_BENCH. */
#define SIDECALL_BENCH_MAX_ITERS (1u << 22)

struct sidecall_bench {
	__u32 op;		/* in: SIDECALL_BENCH_* */
	__u32 path;		/* in: SIDECALL_PATH_* */
	__u32 iters;		/* in: samples (1..SIDECALL_BENCH_MAX_ITERS) */
	__u32 warmup;		/* in: untimed calls first */
	__u64 samples;		/* in: user pointer to iters __u64: TSC cycles */
	__u64 fallbacks;	/* out: timed sidecalls the exit path answered */
	__u32 cpu;		/* out: the CPU it ran on */
	__u32 pad;
};

#define SIDECALL_MSG_LEN 240

struct sidecall_selftest {
	__u32 checks;		/* out: checks made */
	__u32 failures;		/* out: checks failed */
	__u32 cpu;		/* out: the CPU it ran on */
	__u32 apic_id;		/* out: its APIC ID */
	__u64 by_sidecall;	/* out: calls the sidecore answered */
	__u64 by_exit;		/* out: calls an exit path answered */
	char message[SIDECALL_MSG_LEN];	/* out: the first failure, or "" */
};

#define SIDECALL_IOC_MAGIC 0xe5
#define SIDECALL_IOC_INFO	_IOR(SIDECALL_IOC_MAGIC, 1, struct sidecall_info)
#define SIDECALL_IOC_BENCH	_IOWR(SIDECALL_IOC_MAGIC, 2, struct sidecall_bench)
#define SIDECALL_IOC_SELFTEST	_IOR(SIDECALL_IOC_MAGIC, 3, struct sidecall_selftest)

#endif /* SIDECALL_UAPI_H */
