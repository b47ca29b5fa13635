//! x86-64: where boot structures live, how to build them, and how to put a vCPU in a CPU mode.

/// ACPI tables that tell a guest about its CPUs and I/O APIC.
pub mod acpi;
/// CPUID normalization per vCPU and caller edits.
pub mod cpuid;
/// The default exception table of raw guests: IDTs and stubs that report exceptions to the VMM.
pub mod exceptions;
/// Global descriptor table entries and the segments they describe.
pub mod gdt;
/// Local APIC set-up Linux expects from firmware.
pub mod lapic;
/// Guest-physical addresses of the structures kvmkit writes.
pub mod layout;
/// Real, protected and long mode: the register state that enters each.
pub mod mode;
/// MultiProcessor Specification tables that tell a guest without ACPI about its CPUs and I/O APIC.
pub mod mptable;
/// Model-specific registers a Linux guest starts with.
pub mod msr;
/// Translating virtual addresses by walking the guest's page tables.
pub mod pagewalk;
/// Identity-mapped page tables for long mode.
pub mod paging;
/// Registers by name: general registers and their parts, control and segment registers.
pub mod registers;

/// The byte that makes `bytes` sum to zero modulo 256, which is how a guest validates the MP and
/// ACPI tables firmware leaves it.
pub(crate) fn table_checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &byte| sum.wrapping_sub(byte))
}
