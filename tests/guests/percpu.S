# Per-vCPU rendezvous, 32-bit protected mode, no stack: ESI = vCPU index, ECX = vCPU count, DX = report port; lock-increments dword [0x2000] and spins until it equals ECX (so all vCPUs must run at once), then EAX = 0xC0DE0000 + (ESI + 1) * 0x111, OUT DX, EAX, stores EAX at [0x2100 + 4 * ESI]; HLT.
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
_start:
	lock inc dword ptr [0x2000]
1:	pause
	cmp	dword ptr [0x2000], ecx
	jne	1b
	lea	eax, [esi + 1]
	imul	eax, eax, 0x111
	add	eax, 0xC0DE0000
	out	dx, eax
	mov	dword ptr [0x2100 + esi * 4], eax
	hlt
