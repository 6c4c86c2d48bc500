/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What sidecore.ko exports to other kernel code.
 *
 * Every call runs on the calling CPU with interrupts off for its duration
 * (one ring and one exit-path mailbox per CPU), so it may be made from any
 * context but NMI. A call goes to the sidecore through the CPU's ring and
 * falls back to its exit path at most once: a call is never carried out
 * twice. Reply status codes are shm-proto's (SIDECALL_ST_* in
 * sidecall_uapi.h).
 */
#ifndef SIDECORE_H
#define SIDECORE_H

#include <linux/types.h>

#define SIDECORE_WORDS 6

/*
 * Makes call @op with @args. Returns 0 with @out, @status and @by_sidecall
 * (whether the sidecore answered; each may be NULL) set, or -ENODEV when
 * this CPU has no vCPU block, -EBUSY in NMI context.
 */
int sidecore_call(u16 op, const u64 args[SIDECORE_WORDS],
		  u64 out[SIDECORE_WORDS], u32 *status, bool *by_sidecall);

/* The null call: 0 when answered (its word echoed by the sidecore). */
int sidecore_null(u64 v);

/* CPUID @leaf.@sub as the sidecore (or the cpuid instruction) answers it. */
int sidecore_cpuid(u32 leaf, u32 sub, u32 regs[4]);

/* HC_COUNTER_ADD: adds @v to this vCPU's counter; *@new is its new value. */
int sidecore_counter_add(u64 v, u64 *new);

#endif /* SIDECORE_H */
