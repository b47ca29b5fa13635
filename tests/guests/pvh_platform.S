# A kernel-like ELF entered through PVH (32-bit, paging off, EBX = hvm_start_info) that drives
# kvmkit's Linux platform: prints "cmdline=<command line> memmap=<entries> modules=<count>" on
# COM1, echoes console input up to '!' or '.', writes the boot-timer byte, checks the CMOS RTC's
# register D, then after '!' resets through the i8042 and after '.' powers off through the ACPI
# sleep control register. Any check that fails triple-faults (ud2 with no IDT).
	.intel_syntax noprefix
	.code32

	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 4, 18			# name size, descriptor size, XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.long _start

	.text
	.globl _start
_start:
	mov	ebp, ebx
	cmp	dword ptr [ebp], 0x336ec578	# hvm_start_info magic
	jne	fail
	lea	esi, [label_cmdline]
	call	puts
	mov	esi, [ebp + 24]			# cmdline_paddr
	call	puts
	lea	esi, [label_memmap]
	call	puts
	mov	al, [ebp + 48]			# memmap_entries
	add	al, '0'
	call	putc
	lea	esi, [label_modules]
	call	puts
	mov	al, [ebp + 12]			# nr_modules
	add	al, '0'
	call	putc
	mov	al, '\n'
	call	putc
echo:	call	getc
	cmp	al, '!'
	je	done
	cmp	al, '.'
	je	done
	call	putc
	jmp	echo
done:	mov	bl, al				# how to end
	mov	byte ptr [0xd0000000], 123	# boot timer
	mov	al, 0x0d			# CMOS register D: "valid RAM and time"
	out	0x70, al
	in	al, 0x71
	cmp	al, 0x80
	jne	fail
	cmp	bl, '.'
	je	poweroff
	mov	al, 0xfe			# i8042: pulse the reset line
	out	0x64, al
	jmp	fail
poweroff:
	mov	al, 0x34			# SLP_EN | SLP_TYP 5, the DSDT's S5 type
	mov	dx, 0x3c0			# the FADT's sleep control register
	out	dx, al
fail:	ud2

# COM1: wait for the transmitter, then send AL.
putc:	mov	ah, al
1:	mov	dx, 0x3fd
	in	al, dx
	test	al, 0x20
	jz	1b
	mov	al, ah
	mov	dx, 0x3f8
	out	dx, al
	ret

# COM1: wait for a received byte and return it in AL.
getc:	mov	dx, 0x3fd
1:	in	al, dx
	test	al, 0x01
	jz	1b
	mov	dx, 0x3f8
	in	al, dx
	ret

# Sends the zero-terminated string at ESI.
puts:	lodsb
	test	al, al
	jz	2f
	call	putc
	jmp	puts
2:	ret

label_cmdline:	.asciz "cmdline="
label_memmap:	.asciz " memmap="
label_modules:	.asciz " modules="
