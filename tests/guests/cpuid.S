# CPUID, 32-bit protected mode: EAX = leaf, ECX = subleaf; executes CPUID (results in EAX/EBX/ECX/EDX); HLT.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
	cpuid
	hlt
