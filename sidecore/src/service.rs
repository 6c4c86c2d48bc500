//! The services, as handlers that the sidecore and the VMM's exit path both
//! call, so that both paths compute identical answers.

use shm_proto::op::{self, Opcode, Status, USER_OP_FIRST, USER_OP_LAST, WORDS};

use crate::cpuid::{CpuidTable, GuestState};
use crate::pte::PteService;

/// Who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallCtx {
    /// The calling vCPU's index (trusted: the host knows which ring or which
    /// vCPU thread the request came from).
    pub vcpu: u32,
}

/// A registry hypercall: takes the request words, returns the result words or
/// an error status. Runs on the sidecore's hot path: no blocking, no
/// allocation.
pub type Hypercall = Box<dyn Fn(&CallCtx, &[u64; WORDS]) -> Result<[u64; WORDS], Status> + Send + Sync>;

/// Number of registry opcodes.
const REGISTRY_SIZE: usize = (USER_OP_LAST - USER_OP_FIRST) as usize + 1;

/// Registering a hypercall failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The opcode is outside the registry's range.
    #[error("hypercall opcode {0:#x} is outside the registry range {USER_OP_FIRST:#x}..={USER_OP_LAST:#x}")]
    OutOfRange(u16),
    /// The opcode is taken.
    #[error("hypercall opcode {0:#x} is already registered")]
    Taken(u16),
}

/// The services of one VM.
pub struct Services {
    cpuid: Vec<CpuidTable>,
    registry: Vec<Option<Hypercall>>,
    pte: Option<PteService>,
}

impl Services {
    /// Services answering CPUID from one table per vCPU (index = vCPU).
    pub fn new(cpuid: Vec<CpuidTable>) -> Services {
        let mut registry = Vec::with_capacity(REGISTRY_SIZE);
        registry.resize_with(REGISTRY_SIZE, || None);
        Services { cpuid, registry, pte: None }
    }

    /// Adds a hypercall at `opcode` (`0x100..=0x1ff`).
    pub fn register(&mut self, opcode: u16, f: Hypercall) -> Result<(), RegistryError> {
        let i = usize::from(opcode.checked_sub(USER_OP_FIRST).ok_or(RegistryError::OutOfRange(opcode))?);
        let cell = self.registry.get_mut(i).ok_or(RegistryError::OutOfRange(opcode))?;
        if cell.is_some() {
            return Err(RegistryError::Taken(opcode));
        }
        *cell = Some(f);
        Ok(())
    }

    /// Serves page-table updates with `pte`.
    pub fn set_pte(&mut self, pte: PteService) {
        self.pte = Some(pte);
    }

    /// The page-table service, if this VM has one.
    pub fn pte(&self) -> Option<&PteService> {
        self.pte.as_ref()
    }

    /// Registered hypercall opcodes.
    pub fn registered(&self) -> impl Iterator<Item = u16> + '_ {
        self.registry
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_some())
            .filter_map(|(i, _)| u16::try_from(i).ok().map(|i| i + USER_OP_FIRST))
    }

    /// Number of vCPUs with a CPUID table.
    pub fn vcpus(&self) -> usize {
        self.cpuid.len()
    }

    /// Validates and carries out one request whose head word and argument
    /// words were copied out of guest memory once. Every value is treated
    /// as hostile; the result is a status and the reply words.
    pub fn dispatch(&self, ctx: &CallCtx, head: u64, words: &[u64; WORDS]) -> (Status, [u64; WORDS]) {
        match self.handle(ctx, head, words) {
            Ok(out) => (Status::Ok, out),
            Err(s) => (s, [0; WORDS]),
        }
    }

    fn handle(&self, ctx: &CallCtx, head: u64, words: &[u64; WORDS]) -> Result<[u64; WORDS], Status> {
        let h = op::decode_head(head)?;
        match Opcode::from_u16(h.opcode) {
            Some(Opcode::Null) => Ok([words[0], 0, 0, 0, 0, 0]),
            Some(Opcode::Cpuid) => {
                let leaf = u32::try_from(words[0]).map_err(|_| Status::BadArgument)?;
                let sub = u32::try_from(words[1]).map_err(|_| Status::BadArgument)?;
                let table = usize::try_from(ctx.vcpu).ok().and_then(|v| self.cpuid.get(v)).ok_or(Status::HostError)?;
                // XCR0 bit 0 is always set: zero means a v1 request that
                // carries no vCPU state, answered as the table holds it.
                let r = if words[3] == 0 {
                    table.lookup(leaf, sub)
                } else {
                    let state = GuestState { cr4: words[2], xcr0: words[3], xss: words[4], apic_base: words[5] };
                    table.lookup_in(leaf, sub, &state)
                };
                Ok([u64::from(r[0]), u64::from(r[1]), u64::from(r[2]), u64::from(r[3]), 0, 0])
            }
            Some(Opcode::PteUpdate) => {
                let pte = self.pte.as_ref().ok_or(Status::UnknownOp)?;
                let (kind, entry) = pte.update(words[0], words[1], words[2])?;
                Ok([kind as u64, entry, 0, 0, 0, 0])
            }
            None => {
                let i = h.opcode.checked_sub(USER_OP_FIRST).ok_or(Status::UnknownOp)?;
                match self.registry.get(usize::from(i)) {
                    Some(Some(f)) => f(ctx, words),
                    _ => Err(Status::UnknownOp),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use crate::cpuid::CpuidEntry;
    use shm_proto::op::{encode_head, FLAG_NO_REPLY};

    fn services() -> Services {
        let t = CpuidTable::new(vec![CpuidEntry { function: 0, eax: 1, ebx: 2, ecx: 3, edx: 4, ..Default::default() }]);
        let mut s = Services::new(vec![t]);
        s.register(0x100, Box::new(|ctx, w| Ok([w[0] + u64::from(ctx.vcpu), 0, 0, 0, 0, 0]))).unwrap();
        s
    }

    const CTX: CallCtx = CallCtx { vcpu: 0 };

    #[test]
    fn null_echoes_word_zero() {
        let (st, out) = services().dispatch(&CTX, encode_head(1, 0), &[42, 1, 2, 3, 4, 5]);
        assert_eq!((st, out[0]), (Status::Ok, 42));
    }

    #[test]
    fn cpuid_answers_from_the_vcpu_table() {
        let s = services();
        assert_eq!(s.dispatch(&CTX, encode_head(2, 0), &[0, 0, 0, 0, 0, 0]).1[..4], [1, 2, 3, 4]);
        assert_eq!(s.dispatch(&CTX, encode_head(2, 0), &[1 << 32, 0, 0, 0, 0, 0]).0, Status::BadArgument);
        assert_eq!(s.dispatch(&CTX, encode_head(2, 0), &[0, u64::MAX, 0, 0, 0, 0]).0, Status::BadArgument);
        // v2: the vCPU state in words 2..6 (a table with no leaf 1, 7 or 0xD
        // answers the same).
        assert_eq!(s.dispatch(&CTX, encode_head(2, 0), &[0, 0, u64::MAX, 1, u64::MAX, u64::MAX]).1[..4], [1, 2, 3, 4]);
        // A vCPU with no table (a hostile ring index can never get here, but
        // the handler must not index out of bounds either).
        assert_eq!(s.dispatch(&CallCtx { vcpu: 7 }, encode_head(2, 0), &[0; WORDS]).0, Status::HostError);
    }

    #[test]
    fn cpuid_v2_applies_the_vcpu_state_and_v1_does_not() {
        use crate::cpuid::{APIC_BASE_ENABLE, CR4_OSXSAVE, FLAG_SIGNIFICANT_INDEX};
        let t = CpuidTable::new(vec![
            CpuidEntry { function: 1, ecx: 1 << 26, edx: 1 << 9, ..Default::default() },
            CpuidEntry { function: 0xd, flags: FLAG_SIGNIFICANT_INDEX, eax: 7, ebx: 0x340, ..Default::default() },
            CpuidEntry {
                function: 0xd,
                index: 2,
                flags: FLAG_SIGNIFICANT_INDEX,
                eax: 0x100,
                ebx: 0x240,
                ..Default::default()
            },
        ]);
        let s = Services::new(vec![t]);
        let call = |w: [u64; WORDS]| {
            let (st, out) = s.dispatch(&CTX, encode_head(2, 0), &w);
            assert_eq!(st, Status::Ok);
            [out[0], out[1], out[2], out[3]]
        };
        assert_eq!(call([1, 0, 0, 0, 0, 0]), [0, 0, 1 << 26, 1 << 9], "v1: the table");
        assert_eq!(call([1, 0, CR4_OSXSAVE, 1, 0, APIC_BASE_ENABLE]), [0, 0, 3 << 26, 1 << 9]);
        assert_eq!(call([1, 0, 0, 1, 0, 0]), [0, 0, 1 << 26, 0]);
        assert_eq!(call([0xd, 0, CR4_OSXSAVE, 3, 0, 0])[1], 576);
        assert_eq!(call([0xd, 0, CR4_OSXSAVE, 7, 0, 0])[1], 0x340);
        assert_eq!(call([0xd, 0, 0, 0, 0, 0])[1], 0x340, "v1: the table");
    }

    #[test]
    fn unknown_and_reserved_are_refused() {
        let s = services();
        for op in [0u16, 4, 0xff, 0x101, 0x1ff, 0x200, 0xffff] {
            assert_eq!(s.dispatch(&CTX, encode_head(op, 0), &[0; WORDS]).0, Status::UnknownOp, "op {op:#x}");
        }
        assert_eq!(s.dispatch(&CTX, 1 | (1 << 40), &[0; WORDS]).0, Status::ReservedBits);
        assert_eq!(s.dispatch(&CTX, encode_head(1, 0x8000), &[0; WORDS]).0, Status::ReservedBits);
        assert_eq!(s.dispatch(&CTX, encode_head(1, FLAG_NO_REPLY), &[0; WORDS]).0, Status::Ok);
    }

    #[test]
    fn registry_dispatches_and_refuses_bad_registrations() {
        let mut s = services();
        assert_eq!(
            s.dispatch(&CallCtx { vcpu: 2 }, encode_head(0x100, 0), &[5, 0, 0, 0, 0, 0]),
            (Status::Ok, [7, 0, 0, 0, 0, 0])
        );
        assert!(matches!(s.register(0x100, Box::new(|_, _| Ok([0; WORDS]))), Err(RegistryError::Taken(0x100))));
        assert!(matches!(s.register(0x99, Box::new(|_, _| Ok([0; WORDS]))), Err(RegistryError::OutOfRange(0x99))));
        assert!(matches!(s.register(0x200, Box::new(|_, _| Ok([0; WORDS]))), Err(RegistryError::OutOfRange(0x200))));
        s.register(0x1ff, Box::new(|_, _| Err(Status::Denied))).unwrap();
        assert_eq!(s.dispatch(&CTX, encode_head(0x1ff, 0), &[0; WORDS]).0, Status::Denied);
        assert_eq!(s.registered().collect::<Vec<_>>(), vec![0x100, 0x1ff]);
    }
}
