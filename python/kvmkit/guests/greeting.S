# The demo guest: 64-bit code that greets whoever the host names. It reads the name byte by byte
# from port 0xE8 (until a zero byte) and writes its greeting to port 0xE9, then halts.
# Entered in long mode at its load address with a stack; assembled with `as --64` and
# `objcopy -O binary` into greeting.bin next to this file.
    .intel_syntax noprefix
    .code64
    .text
start:
    lea rsi, [rip + hello]
    call puts
    xor ecx, ecx                # count the name's letters
1:  in al, 0xE8
    test al, al
    jz 2f
    out 0xE9, al
    inc ecx
    jmp 1b
2:  lea rsi, [rip + middle]
    call puts
    mov eax, ecx                # print the count in decimal
    call putu
    lea rsi, [rip + tail]
    call puts
    hlt

# Writes the zero-terminated string at rsi.
puts:
    lodsb
    test al, al
    jz 3f
    out 0xE9, al
    jmp puts
3:  ret

# Writes eax in decimal.
putu:
    mov ebx, 10
    xor edi, edi                # digits pushed
4:  xor edx, edx
    div ebx
    add dl, '0'
    push rdx
    inc edi
    test eax, eax
    jnz 4b
5:  pop rax
    out 0xE9, al
    dec edi
    jnz 5b
    ret

hello:  .asciz "Hello, "
middle: .asciz "! Your name has "
tail:   .asciz " letters. Greetings from a kvmkit guest in 64-bit long mode.\n"
